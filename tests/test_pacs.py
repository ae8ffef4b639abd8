"""``rsna19 serve`` against a real PACS (Orthanc) and a real browser (headless Chromium): ``make test-pacs``.

Every test here is marked ``pacs`` (left out of ``make test``). Orthanc (Debian package ``orthanc``, GPL: an external
test service started as a subprocess, never imported) and Chromium (Debian ``chromium``) run on free loopback
ports and stop when the test ends. Without them the tests are skipped with the reason; with
``RSNA19_REQUIRE_PACS=1`` (set by ``make test-pacs``, which installs both) they fail instead.

* harness: Orthanc alone (start, upload, C-STORE to a pynetdicom SCP, store from a declared node only, restart
  keeps the storage) and Chromium alone (DOM order and a red first row of a static worklist page);
* round trip: Orthanc sends synthetic studies to the node; the SR and SC come back into the same studies, the SR
  naming every source instance and holding the node's probabilities and flag;
* worklist: Chromium loads the node's page (behind a named token) while studies arrive; the rows follow
  ``/api/studies``, flagged rows are marked red on the screenshot (``RSNA19_PACS_ARTIFACTS=DIR`` keeps the PNG),
  patient and accession are shown, "open in PACS" redirects to Orthanc's page of the study, an acknowledgement
  names its reader, the flagged-only filter keeps the flagged rows;
* security: DICOM TLS both ways with Orthanc (a CA made by the test); a plain connection to the node's TLS port,
  an AE title the node does not allow and an allowed title from a wrong address are refused and counted;
* faults: SIGKILL of the node while receiving and while predicting, Orthanc restarted while results are sent:
  every study ends with exactly one SR in Orthanc.

The bundle is the tiny pipeline run's (made once per session, about a minute on 2 cores) unless
``RSNA19_PACS_BUNDLE=DIR`` names one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pacs.browser import bands, dump_dom, find_chromium, screenshot, worklist_rows
from pacs.node import Node, serve_available, write_study
from pacs.orthanc import Orthanc, OrthancError, find_orthanc, free_port, wait_for

pytestmark = pytest.mark.pacs

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
UID_ROOT = "1.2.826.0.1.3680043.10.1226.88"
ROOT = Path(__file__).resolve().parents[1]


def _require(problem: str | None, what: str) -> None:
    if problem:
        if os.environ.get("RSNA19_REQUIRE_PACS") == "1":
            pytest.fail(f"{what}: {problem}")
        pytest.skip(f"{what}: {problem}; `make test-pacs` installs Orthanc and Chromium")


@pytest.fixture
def orthanc_exe() -> str:
    exe = find_orthanc()
    _require(None if exe else "Orthanc is not installed (apt-get install -y orthanc)", "no Orthanc")
    return str(exe)


@pytest.fixture
def chromium_exe() -> str:
    exe = find_chromium()
    _require(None if exe else "Chromium is not installed (apt-get install -y chromium)", "no Chromium")
    return str(exe)


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The bundle the node serves: ``RSNA19_PACS_BUNDLE`` or one exported from the tiny run."""
    _require(serve_available(), "no rsna19 serve")
    if os.environ.get("RSNA19_PACS_BUNDLE"):
        return Path(os.environ["RSNA19_PACS_BUNDLE"])
    from rsna19.study.bundle import export_bundle

    tiny_run = request.getfixturevalue("tiny_run")
    return export_bundle(tiny_run, tmp_path_factory.mktemp("pacs_bundle") / "bundle").path


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where pictures worth keeping go: ``RSNA19_PACS_ARTIFACTS`` or the test's tmp folder."""
    out = Path(os.environ.get("RSNA19_PACS_ARTIFACTS") or tmp_path / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- harness: Orthanc alone ---------------------------------------------------------------------------------------
class StorageSCP:
    """A pynetdicom Storage SCP on a free loopback port that keeps what it receives (SOP UID → dataset)."""

    def __init__(self, ae_title: str = "TESTSCP") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.ae_title = ae_title
        self.port = free_port()
        self.received: dict[str, object] = {}
        self.callers: set[str] = set()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event) -> int:  # noqa: ANN001 - pynetdicom's event
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received[str(ds.SOPInstanceUID)] = ds
        self.callers.add(str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _c_store(path: Path, port: int, calling: str, called: str = "ORTHANC") -> int | None:
    """C-STORE one file with pynetdicom; the status, or None when the association was refused."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian])
    ae.add_requested_context(ds.SOPClassUID, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def test_orthanc_harness(orthanc_exe: str, tmp_path: Path) -> None:
    """Upload over REST, C-STORE to a test SCP over REST, store from a declared node only, restart keeps data."""
    study_uid = f"{UID_ROOT}.1"
    files = write_study(tmp_path / "study", study_uid, seed=5, slices=4)
    scp = StorageSCP()
    try:
        with Orthanc(tmp_path / "orthanc") as pacs:
            pacs.add_modality("scp", scp.ae_title, "127.0.0.1", scp.port)
            ids = pacs.upload_folder(tmp_path / "study")
            assert len(ids) == len(files)
            sid = pacs.study_id(study_uid)
            assert sid is not None and len(pacs.study_instances(sid)) == len(files)
            assert pacs.echo("scp")
            pacs.store("scp", [sid])
            sops = {str(pacs.tags(i)["SOPInstanceUID"]) for i in ids}
            assert set(scp.received) == sops
            assert scp.callers == {"ORTHANC"}
            tags = pacs.tags(ids[0])
            assert tags["StudyInstanceUID"] == study_uid and tags["Modality"] == "CT"

            # The declared node may store into Orthanc; an unknown AE title may not.
            extra = write_study(tmp_path / "extra", f"{UID_ROOT}.2", seed=6, slices=1)[0]
            assert _c_store(extra, pacs.dicom_port, calling="STRANGER") != 0x0000
            assert pacs.study_id(f"{UID_ROOT}.2") is None
            assert _c_store(extra, pacs.dicom_port, calling=scp.ae_title) == 0x0000
            assert pacs.study_id(f"{UID_ROOT}.2") is not None

            # A restart keeps the storage and the ports; the modality added at run time is still known.
            pacs.restart()
            assert pacs.study_id(study_uid) == sid and pacs.study_id(f"{UID_ROOT}.2") is not None
            assert pacs.echo("scp")
        assert pacs.proc is None
        with pytest.raises(OSError):
            pacs.get("/system", timeout=1.0)
    finally:
        scp.close()


def test_orthanc_refuses_bad_request(orthanc_exe: str, tmp_path: Path) -> None:
    """A REST error carries Orthanc's status (the helpers never hide a failed call)."""
    with Orthanc(tmp_path / "orthanc") as pacs, pytest.raises(OrthancError, match="HTTP 4"):
        pacs.store("nobody", ["0000"])


# -- harness: Chromium alone --------------------------------------------------------------------------------------
STATIC_PAGE = """<!doctype html><html><head><style>
body {{ margin: 0; font: 14px sans-serif; }} td {{ padding: 8px; }}
tr.flagged {{ background: #c62828; color: white; }}
</style></head><body><table id="worklist"><tbody></tbody></table><script>
// rendered by script, like the node's page: the DOM dump must hold what the script wrote
const rows = {rows};
document.querySelector('#worklist tbody').innerHTML = rows.map(r =>
  `<tr class="study${{r.flag ? ' flagged' : ''}}" data-study-uid="${{r.uid}}"><td>${{r.p}}</td></tr>`).join('');
</script></body></html>"""


def test_chromium_harness(chromium_exe: str, tmp_path: Path, artifacts: Path) -> None:
    """The DOM after the page's script ran lists the rows in order; the screenshot's first row is red."""
    page = tmp_path / "worklist.html"
    rows = '[{"uid": "a", "flag": true, "p": 0.97}, {"uid": "b", "flag": false, "p": 0.12}]'
    page.write_text(STATIC_PAGE.format(rows=rows), encoding="utf-8")
    assert worklist_rows(dump_dom(page.as_uri())) == [("a", True), ("b", False)]
    png = screenshot(page.as_uri(), artifacts / "static_worklist.png", size=(400, 200))
    found = bands(png)
    assert found[0][2], f"first row not red: {found}"
    assert not found[-1][2], f"last row red: {found}"
    assert sum(red for _, _, red in found) == 1


# -- the node against Orthanc -------------------------------------------------------------------------------------
class Setup:
    """Orthanc and the node wired both ways: Orthanc's modality ``rsna19`` is the node, the node's destination is
    Orthanc."""

    def __init__(self, root: Path, bundle: Path, quiet: float = 2.0, lua: str | None = None, **node_kw: object) -> None:
        self.pacs = Orthanc(root / "orthanc", lua=lua).start()
        dest = f"{self.pacs.aet}@127.0.0.1:{self.pacs.dicom_port}"
        config = dict(node_kw.pop("config", None) or {})  # type: ignore[call-overload]
        if "viewer_url" in config:
            config["viewer_url"] = str(config["viewer_url"]).replace("{pacs}", self.pacs.url)
        node_kw["config"] = config
        self.node = Node(root / "spool", bundle, destinations=[dest], quiet_seconds=quiet, **node_kw)  # type: ignore[arg-type]
        try:
            self.node.start()
        except Exception:
            self.pacs.stop()
            raise
        self.pacs.add_modality("rsna19", self.node.ae_title, "127.0.0.1", self.node.dicom_port)
        self.root = root

    def add_study(self, n: int, slices: int = 8, scout: bool = False) -> tuple[str, str, list[str]]:
        """Write and upload study ``n``: (StudyInstanceUID, Orthanc study ID, SOP instance UIDs)."""
        uid = f"{UID_ROOT}.{100 + n}"
        files = write_study(self.root / "studies" / str(n), uid, seed=5 + n, slices=slices, scout=scout)
        self.pacs.upload_folder(self.root / "studies" / str(n))
        sid = self.pacs.study_id(uid)
        assert sid is not None
        return uid, sid, [f"{uid}.1.{k + 1}" for k in range(len(files))]

    def wait_sent(self, uids: list[str], timeout: float = 180.0) -> dict[str, dict]:
        def all_sent() -> dict[str, dict] | None:
            rows = {s["study_uid"]: s for s in self.node.studies()}
            failed = [u for u in uids if rows.get(u, {}).get("status") == "failed"]
            assert not failed, f"failed: {[rows[u].get('error') for u in failed]}\n{self.node.log_tail()}"
            return rows if all(rows.get(u, {}).get("status") == "sent" for u in uids) else None

        try:
            return wait_for(all_sent, timeout, what=f"studies {uids} sent")
        except TimeoutError:
            msg = f"not sent in {timeout:.0f} s: {self.node.studies()}\n{self.node.log_tail()}"
            raise AssertionError(msg) from None

    def close(self) -> None:
        try:
            self.node.stop()
        finally:
            self.pacs.stop()


@pytest.fixture
def setup(orthanc_exe: str, serve_bundle: Path, tmp_path: Path):
    s = Setup(tmp_path, serve_bundle)
    yield s
    s.close()


def _sr_results(tags: dict) -> dict[str, dict]:
    """Class → {probability, positive} read from the simplified tags of a TID 1500 SR (Orthanc's JSON)."""
    from rsna19.core.constants import CLASSES
    from rsna19.inference.dicom_out import finding_code

    meaning_to_class = {finding_code(c).meaning: c for c in CLASSES}
    out: dict[str, dict] = {}

    def name(item: dict) -> str:
        seq = item.get("ConceptNameCodeSequence") or [{}]
        return str(seq[0].get("CodeMeaning", ""))

    def walk(items: list[dict]) -> None:
        for item in items or []:
            if name(item) == "Measurement Group":
                group: dict = {}
                for child in item.get("ContentSequence") or []:
                    if name(child) == "Finding":
                        group["class"] = meaning_to_class.get(child["ConceptCodeSequence"][0]["CodeMeaning"])
                    elif name(child) == "Probability":
                        group["probability"] = float(child["MeasuredValueSequence"][0]["NumericValue"])
                    elif name(child) in meaning_to_class and child.get("ValueType") == "CODE":
                        group["positive"] = child["ConceptCodeSequence"][0]["CodeMeaning"] == "Present"
                if group.get("class"):
                    out[group["class"]] = group
            walk(item.get("ContentSequence") or [])

    walk(tags.get("ContentSequence") or [])
    return out


def _evidence_uids(tags: dict) -> set[str]:
    return {
        str(sop["ReferencedSOPInstanceUID"])
        for study in tags.get("CurrentRequestedProcedureEvidenceSequence") or []
        for series in study.get("ReferencedSeriesSequence") or []
        for sop in series.get("ReferencedSOPSequence") or []
    }


def _check_answer(pacs: Orthanc, uid: str, sops: list[str], row: dict) -> None:
    """Orthanc holds exactly one SR and one SC in the study, the SR naming the sources and the node's result."""
    by_modality = pacs.instances_by_modality(uid)
    assert len(by_modality.get("CT", [])) == len(sops)
    srs = [t for t in by_modality.get("SR", []) if t["SOPClassUID"] == SR_CLASS]
    scs = [t for tags in by_modality.values() for t in tags if t["SOPClassUID"] == SC_CLASS]
    assert len(srs) == 1, f"{len(srs)} SRs in study {uid}"
    assert len(scs) == 1, f"{len(scs)} SCs in study {uid}"
    sr, sc = srs[0], scs[0]
    assert sr["StudyInstanceUID"] == sc["StudyInstanceUID"] == uid
    assert sr["PatientID"] == by_modality["CT"][0]["PatientID"]
    assert sr["ConceptNameCodeSequence"][0]["CodeMeaning"] == "Imaging Measurement Report"  # TID 1500
    assert _evidence_uids(sr) == set(sops)
    results = _sr_results(sr)
    assert set(results) == set(row["probabilities"])
    for cls, p in row["probabilities"].items():
        assert results[cls]["probability"] == pytest.approx(p, abs=1e-4), cls
        assert results[cls]["positive"] == row["flags"][cls], cls
    assert row["flag"] == results["any"]["positive"]
    assert row["p_any"] == pytest.approx(results["any"]["probability"], abs=1e-4)


def _answer_counts(pacs: Orthanc, uid: str, row: dict) -> dict[str, int]:
    """CT instances received by the node, SRs and SCs of the node in Orthanc's copy of the study."""
    by_modality = pacs.instances_by_modality(uid)
    every = [t for tags in by_modality.values() for t in tags]
    return {
        "instances_received": row["n_instances"],
        "sr_in_orthanc": sum(t["SOPClassUID"] == SR_CLASS for t in every),
        "sc_in_orthanc": sum(t["SOPClassUID"] == SC_CLASS for t in every),
    }


def test_roundtrip_results_in_same_study(setup: Setup) -> None:
    """Orthanc → node (C-STORE of whole studies) → SR + SC back into each study, checked over Orthanc's REST API."""
    studies = [setup.add_study(0), setup.add_study(1, slices=5)]
    assert setup.pacs.echo("rsna19")
    for _, sid, _ in studies:
        setup.pacs.store("rsna19", [sid])
    rows = setup.wait_sent([u for u, _, _ in studies])
    for uid, _, sops in studies:
        row = rows[uid]
        assert row["n_instances"] == len(sops)
        assert row["answered_s"] >= row["received_s"] and row["latency_s"] >= 0
        _check_answer(setup.pacs, uid, sops, row)
    metrics = setup.node.metrics()
    assert "rsna19_studies_received_total 2" in metrics.replace(".0\n", "\n")


def _doc_lua() -> str:
    """The routing rule of docs/reading_room.md (its only ``lua`` code block)."""
    text = (ROOT / "docs" / "reading_room.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^ *```lua\n(.*?)^ *```", text, flags=re.M | re.S)
    assert len(blocks) == 1, "docs/reading_room.md should hold one lua block"
    return textwrap.dedent(blocks[0])


def test_documented_routing_rule(orthanc_exe: str, serve_bundle: Path, tmp_path: Path) -> None:
    """The Lua rule of the docs: a study uploaded to Orthanc reaches the node by itself, is answered once, and the
    returning SR and SC do not send it again."""
    s = Setup(tmp_path, serve_bundle, lua=_doc_lua())
    try:
        uid, _, sops = s.add_study(0)  # uploaded only: the rule sends it once it is stable (StableAge 2 s)
        rows = s.wait_sent([uid])
        _check_answer(s.pacs, uid, sops, rows[uid])
        # After the SR and SC arrived the study becomes stable again: the rule must leave it alone.
        time.sleep(s.pacs.config()["StableAge"] + s.node.quiet_seconds + 4)
        assert s.node.study(uid)["status"] == "sent"
        assert s.node.study(uid)["n_instances"] == len(sops)
        assert "rsna19_instances_received_total " + str(len(sops)) in s.node.metrics().replace(".0\n", "\n")
        _check_answer(s.pacs, uid, sops, s.node.study(uid))
    finally:
        s.close()


#: ``viewer_url`` of the worklist test: Orthanc's explorer page of a study (``{pacs}``: Orthanc's URL, set by Setup).
VIEWER = "{pacs}/app/explorer.html#study?uuid={orthanc_id}"


def test_worklist_in_browser(orthanc_exe: str, chromium_exe: str, serve_bundle: Path, tmp_path: Path,
                             artifacts: Path) -> None:  # fmt: skip
    """Chromium shows the worklist while studies arrive: rows in API order, flagged rows marked red, patient and
    accession behind the token, "open in PACS" going to Orthanc's page of that very study, acknowledge (who, when)
    and the flagged-only filter. The screenshot is docs/img/worklist.png."""
    token = ("reader1", "reader1-secret-token")
    setup = Setup(tmp_path, serve_bundle, token=token, config={"viewer_url": VIEWER})
    try:
        _worklist(setup, artifacts)
    finally:
        setup.close()


def _worklist(setup: Setup, artifacts: Path) -> None:
    uid_a, sid_a, _ = setup.add_study(0)
    uid_b, sid_b, _ = setup.add_study(1)
    uid_c, sid_c, _ = setup.add_study(2, scout=True)  # only a scout: cannot be predicted, stays at the bottom
    setup.pacs.store("rsna19", [sid_a])
    sender = threading.Thread(target=setup.pacs.store, args=("rsna19", [sid_b, sid_c]))
    sender.start()
    # While the rest arrives (and the first is predicted), the page already lists what the node has.
    early = worklist_rows(dump_dom(setup.node.page_url, wait_ms=2500))
    assert uid_a in [u for u, _ in early]
    sender.join()

    def settled() -> list | None:
        rows = {s["study_uid"]: s for s in setup.node.studies()}
        done = all(rows.get(u, {}).get("status") in ("sent", "failed") for u in (uid_a, uid_b, uid_c))
        return list(rows.values()) if done else None

    api = wait_for(settled, 180, what="three studies answered")
    assert {s["study_uid"] for s in api} == {uid_a, uid_b, uid_c}
    ct = setup.pacs.tags(setup.pacs.study_instances(sid_a)[0]["ID"])
    by_uid = {s["study_uid"]: s for s in api}
    assert by_uid[uid_a]["patient_id"] == ct["PatientID"] and by_uid[uid_a]["accession"] == ct["AccessionNumber"]

    # "open in PACS": the node's redirect lands on Orthanc's page of that study (Orthanc's own study ID).
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(setup.node.request(by_uid[uid_a]["viewer_url"]), timeout=10)
    assert redirect.value.code == 302
    assert redirect.value.headers["Location"] == f"{setup.pacs.url}/app/explorer.html#study?uuid={sid_a}"
    # Acknowledge the top flagged study as reader1.
    api_now = setup.node.studies()
    top = api_now[0]
    if top["flag"]:
        answer = setup.node.post_json(f"/api/studies/{top['study_uid']}/acknowledge")
        assert answer["review"] == "acknowledged" and answer["review_by"] == "reader1"
    html = dump_dom(setup.node.page_url, wait_ms=3000)
    rows = worklist_rows(html)
    api_now = setup.node.studies()
    assert [u for u, _ in rows] == [s["study_uid"] for s in api_now]
    assert [f for _, f in rows] == [bool(s["flag"]) for s in api_now]
    ps = [s["p_any"] for s in api_now if s["p_any"] is not None]
    assert ps == sorted(ps, reverse=True)
    assert api_now[-1]["study_uid"] == uid_c and not rows[-1][1]  # p_any null: last, unflagged
    patient_name = str(ct.get("PatientName", "")).replace("^", " ").strip()
    assert patient_name and patient_name in html and ct["AccessionNumber"] in html  # behind the token
    assert f"/studies/{uid_a}/viewer" in html and "open in PACS" in html
    if top["flag"]:
        assert "acknowledged by <b>reader1</b>" in html
    # Without the token: 401, and no patient field leaks into the page.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(setup.node.url + "/", timeout=10)
    assert denied.value.code == 401
    # The flagged-only filter (the checkbox's ?flagged=1).
    flagged_rows = worklist_rows(dump_dom(setup.node.page_url + "&flagged=1", wait_ms=3000))
    assert [u for u, _ in flagged_rows] == [s["study_uid"] for s in api_now if s["flag"]]
    png = screenshot(setup.node.page_url, artifacts / "worklist.png", size=(1400, 420), wait_ms=3000)
    assert rows[0][1] == bool(api_now[0]["flag"])
    if not rows[0][1]:
        pytest.skip("the bundle flagged none of the studies: nothing red to look for")
    # The flagged rows are marked red (bar and badge) on the picture, above the plain row of the study that could
    # not be predicted.
    found = bands(png)
    red = [b for b in found if b[2]]
    assert red, f"no red mark on the screenshot: {found}"
    last_plain = max(b[0] for b in found if not b[2])
    assert red[0][0] < last_plain and red[-1][1] < last_plain, found


def test_dicom_tls_and_allowed_senders_with_orthanc(orthanc_exe: str, serve_bundle: Path, tmp_path: Path) -> None:
    """DICOM TLS both ways with Orthanc on loopback (a CA made here; both sides require the other's certificate):
    Orthanc sends a study to the node over TLS, the SR and SC come back over TLS. A plain connection to the node's
    TLS port is refused; Orthanc calling with an unknown AE title, and a known title from a wrong address, are
    refused and counted in /metrics and /health."""
    from pacs.certs import make_pki, openssl_available

    _require(openssl_available(), "no openssl")
    pki = make_pki(tmp_path / "pki", names=("node", "orthanc"))
    pacs = Orthanc(tmp_path / "orthanc", tls=(pki["orthanc"].cert, pki["orthanc"].key, pki.ca)).start()
    node = Node(
        tmp_path / "spool",
        serve_bundle,
        destinations=[f"{pacs.aet}@localhost:{pacs.dicom_port}"],
        extra=["--tls-cert", str(pki["node"].cert), "--tls-key", str(pki["node"].key), "--tls-ca", str(pki.ca),
               "--allowed-aet", f"{pacs.aet}@127.0.0.1"],
    )  # fmt: skip
    try:
        node.start()
        pacs.add_modality("rsna19", node.ae_title, "127.0.0.1", node.dicom_port, tls=True)
        pacs.add_modality("stranger", node.ae_title, "127.0.0.1", node.dicom_port, tls=True, local_aet="STRANGER")
        uid = f"{UID_ROOT}.300"
        files = write_study(tmp_path / "study", uid, seed=5, slices=6)
        pacs.upload_folder(tmp_path / "study")
        sid = pacs.study_id(uid)
        assert sid is not None and pacs.echo("rsna19")
        pacs.store("rsna19", [sid])

        def sent() -> dict | None:
            row = node.study(uid)
            assert not row or row["status"] != "failed", f"{row}\n{node.log_tail()}"
            return row if row and row["status"] == "sent" else None

        row = wait_for(sent, 180, what="the study answered over TLS")
        _check_answer(pacs, uid, [f"{uid}.1.{k + 1}" for k in range(len(files))], row)
        # A plain association to the TLS port: no association.
        assert _c_store(files[0], node.dicom_port, calling=pacs.aet, called=node.ae_title) is None
        # Orthanc as "STRANGER" (not allowed): the association is rejected.
        with pytest.raises(OrthancError):
            pacs.store("stranger", [sid])
        # The allowed title from an address it is not allowed from (127.0.0.2), over TLS with a valid certificate.
        import ssl

        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(pki.ca))
        ctx.load_cert_chain(str(pki["orthanc"].cert), str(pki["orthanc"].key))
        ae = AE(ae_title=pacs.aet)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=node.ae_title, tls_args=(ctx, "localhost"),
                             bind_address=("127.0.0.2", 0))  # fmt: skip
        assert assoc.is_rejected
        health = node.health()
        assert health["dicom_tls"] is True and health["associations_refused"] == 2 and health["tls_refused"] >= 1
        metrics = node.metrics()
        assert "rsna19_associations_refused_total 2" in metrics
        events = [e for e in node.log_events() if e.get("event") == "association_refused"]
        assert {e["calling_ae"] for e in events} == {"STRANGER", pacs.aet}
        assert any(e["address"] == "127.0.0.2" for e in events)
    finally:
        node.stop()
        pacs.stop()


def test_faults_every_study_answered_once(setup: Setup, artifacts: Path) -> None:
    """SIGKILL while receiving, SIGKILL while predicting, Orthanc down while results go out: one SR per study.

    What happened is written to ``faults.json`` in the artifacts folder (docs/benchmarks.md quotes it)."""
    pacs, node = setup.pacs, setup.node
    # 1. Killed mid-reception: the node dies while Orthanc is sending; the PACS sends the study again later.
    uid_a, sid_a, sops_a = setup.add_study(0, slices=24)
    sender = threading.Thread(target=lambda: _ignore(OrthancError, pacs.store, "rsna19", [sid_a]))
    sender.start()
    incoming = node.spool / "incoming" / uid_a
    wait_for(lambda: incoming.is_dir() and any(incoming.iterdir()), 60, interval=0.01, what="first instance")
    node.kill()
    on_disk = len(list(incoming.glob("*.dcm")))
    sender.join()
    assert on_disk < len(sops_a), "the whole study arrived before the kill: not a kill mid-reception"
    node.start()
    pacs.store("rsna19", [sid_a])  # the PACS's retry
    # 2. Killed mid-inference.
    uid_b, sid_b, sops_b = setup.add_study(1)
    pacs.store("rsna19", [sid_b])
    wait_for(lambda: (node.study(uid_b) or {}).get("status") == "running", 60, interval=0.05, what="B running")
    node.kill()
    node.start()
    # 3. Orthanc down while the results are being sent: the node retries until it is back. Orthanc crashes
    # (SIGKILL) as soon as it has handed C over, inside the node's quiet period: a graceful stop takes ~1.5 s, and
    # on an idle machine the tiny bundle predicts and sends C in under a second, so the results would have gone
    # out before the PACS went down.
    uid_c, sid_c, sops_c = setup.add_study(2)
    pacs.store("rsna19", [sid_c])
    pacs.kill()
    assert (node.study(uid_c) or {}).get("status") in ("receiving", "queued", "running")  # not answered yet

    def send_failed() -> bool:
        return any(e.get("event") == "send_failed" and e.get("study_uid") == uid_c for e in node.log_events())

    wait_for(send_failed, 120, interval=0.2, what="a failed delivery of C while Orthanc is down")
    assert (node.study(uid_c) or {}).get("status") == "done"  # predicted, not delivered
    pacs.start()
    rows = setup.wait_sent([uid_a, uid_b, uid_c], timeout=240)
    for uid, sops in ((uid_a, sops_a), (uid_b, sops_b), (uid_c, sops_c)):
        assert rows[uid]["n_instances"] == len(sops)  # the PACS's re-send of A counted each instance once
        _check_answer(pacs, uid, sops, rows[uid])
    assert len(node.studies()) == 3
    assert node.starts == 3
    events = node.log_events()
    record = {
        "killed_mid_reception": {"instances": len(sops_a), "on_disk_at_kill": on_disk},
        "killed_mid_inference": {
            "instances": len(sops_b),
            "predictions_started": sum(
                e.get("event") == "study_started" and e.get("study_uid") == uid_b for e in events
            ),
        },
        "orthanc_down_while_sending": {
            "failed_sends": sum(e.get("event") == "send_failed" and e.get("study_uid") == uid_c for e in events)
        },
        "node_starts": node.starts,
        "per_study": {
            name: _answer_counts(pacs, uid, rows[uid]) for name, uid in (("A", uid_a), ("B", uid_b), ("C", uid_c))
        },
    }
    (artifacts / "faults.json").write_text(json.dumps(record, indent=2))


def _ignore(exc: type[BaseException], fn, *args) -> None:  # noqa: ANN001
    """Call ``fn(*args)``; an ``exc`` it raises (the store cut short by the kill) is expected."""
    with contextlib.suppress(exc):
        fn(*args)
