"""Test services for ``make test-pacs``: a throw-away Orthanc PACS, headless Chromium and the ``rsna19 serve`` node.

Orthanc (GPL, Debian package ``orthanc``) and Chromium (Debian package ``chromium``) are external programs started
as subprocesses on loopback ports; nothing here imports them. ``make test-pacs`` installs both when missing.
"""
