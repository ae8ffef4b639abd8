"""The worklist page of ``rsna19 serve`` (HTML, CSS and the script that renders the rows).

:func:`rsna19.serve.http.render_page` fills in ``__SUBTYPES__`` (the subtype classes, JSON), ``__SUB_HEADS__``
(their headers), ``__USER__`` (the token name of the request), ``__PHI__`` (whether patient fields are shown),
``__FLAGGED_CHECKED__``, ``__BANNER__`` (the drift warning line of the node at the time of the request, or nothing)
and ``__DATA__`` (the ``/api/studies`` objects at the time of the request, JSON). The script renders those rows at
once and re-renders them from ``/api/studies`` every 2 s; every value goes through ``esc`` (text, never markup).

A row: flag badge (BLEED red, "no bleed", NOT ASSESSABLE amber with the reason), calibrated p(any), the subtype
probabilities, patient name and ID and accession number (token holders only), time since the first instance
arrived, status, the review (acknowledge / dismiss, then who and when, and "reopen"), a link that opens the study
in the PACS viewer (``viewer_url``), the report thumbnail, and notes (``finding_note``, ``drift``). Flagged rows
carry a red bar and badge, not a red background; reviewed rows are dimmed (all but the badge).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rsna19 worklist</title>
<meta name="referrer" content="no-referrer">
<style>
body { font-family: system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
#bar { display: flex; gap: 2em; align-items: center; font-size: 13px; margin: 6px 0 10px 0; }
#note { color: #555; font-size: 12px; margin: 0; }
table { border-collapse: collapse; width: 100%; }
th { background: #eceff1; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
th, td { border-bottom: 1px solid #cfd8dc; padding: 5px 7px; text-align: left; font-size: 14px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.study td.flag { border-left: 6px solid transparent; white-space: nowrap; }
tr.flagged td.flag { border-left-color: #c62828; }
tr.flagged td.pany { color: #c62828; font-weight: 700; }
tr.not-assessable td.flag { border-left-color: #ef8f00; }
tr.reviewed td:not(.flag) { opacity: .55; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 3px; font-size: 12px; font-weight: 700; }
.badge.bleed { background: #c62828; color: #fff; }
.badge.neg { background: #e8f5e9; color: #2e7d32; }
.badge.na { background: #ef8f00; color: #fff; }
.badge.pending { background: #eceff1; color: #555; }
.why, .small { font-size: 11px; color: #555; }
.hidden { color: #999; font-style: italic; font-size: 12px; }
img.thumb { height: 44px; display: block; }
a.viewer, td.arrived { white-space: nowrap; }
button { font-size: 12px; padding: 2px 6px; margin-right: 3px; cursor: pointer; }
.drift { color: #ef8f00; font-weight: 700; }
#drift-banner { border: 1px solid #ef8f00; background: #fff8e1; padding: 6px 10px; margin: 6px 0; font-size: 13px; }
</style></head>
<body><h1>rsna19 worklist</h1>
<p id="note">Research software, not a medical device: results are not verified and must not guide care. Sorted by
calibrated any-bleed probability; refreshes every 2 s.</p>
<div id="bar"><label><input type="checkbox" id="flagged-only"__FLAGGED_CHECKED__> flagged only</label>
<span>signed in as <b id="user">__USER__</b></span><span id="count"></span></div>
__BANNER__
<table id="worklist"><thead><tr><th>flag</th><th>p(any)</th>__SUB_HEADS__
<th>patient</th><th>accession</th><th>arrived</th><th>status</th><th>review</th><th>open</th><th>report</th>
<th>notes</th></tr></thead>
<tbody></tbody></table>
<script>
const SUBTYPES = __SUBTYPES__;
const PHI = __PHI__;
const INITIAL = __DATA__;
const TOKEN = new URLSearchParams(location.search).get("token");
const box = document.getElementById("flagged-only");
function fmt(p) { return p === null || p === undefined ? "" : p.toFixed(3); }
function esc(s) { const d = document.createElement("div"); d.textContent = s === null || s === undefined ? "" :
  String(s); return d.innerHTML.replace(/"/g, "&quot;"); }
function withToken(u) { return TOKEN ? u + (u.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : u; }
function ago(s) {
  if (s === null || s === undefined) return "";
  s = Math.max(0, s);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
function reason(x) { return typeof x === "string" ? x : (x && (x.reason || x.reasons || JSON.stringify(x))); }
function flagCell(s) {
  if (s.not_assessable) return '<span class="badge na">NOT ASSESSABLE</span><div class="why">' +
    esc(reason(s.not_assessable)) + '</div>';
  if (s.flag === true) return '<span class="badge bleed">BLEED</span>';
  if (s.flag === false) return '<span class="badge neg">no bleed</span>';
  return '<span class="badge pending">' + (s.status === "failed" ? "failed" : "pending") + '</span>';
}
function reviewCell(s) {
  const uid = esc(s.study_uid);
  if (s.review) return esc(s.review) + ' by <b>' + esc(s.review_by) + '</b><div class="small">' +
    esc(ago(Date.now() / 1000 - s.review_s)) + ' <button data-action="reopen" data-uid="' + uid +
    '">reopen</button></div>';
  if (s.flag !== true && !s.not_assessable) return "";  // a flag (or a study the models cannot judge) is reviewed
  return '<button data-action="acknowledge" data-uid="' + uid + '">acknowledge</button>' +
    '<button data-action="dismiss" data-uid="' + uid + '">dismiss</button>';
}
function notes(s) {
  const out = [];
  if (s.finding_note) out.push(esc(s.finding_note));
  if (s.drift) { const d = s.drift; const w = d.warning;
    out.push('<span class="' + (w ? "drift" : "small") + '">drift ' + esc(d.score === undefined ? "" :
      Number(d.score).toFixed(2)) + (w ? " &#9888; " + esc(typeof w === "string" ? w : "past threshold") : "") +
      '</span>'); }
  return out.join("<br>");
}
function row(s) {
  const cls = ["study"];
  if (s.flag === true && !s.not_assessable) cls.push("flagged");
  if (s.not_assessable) cls.push("not-assessable");
  if (s.review) cls.push("reviewed");
  const probs = SUBTYPES.map(c => '<td class="num sub">' + fmt(s.probabilities[c]) + '</td>').join("");
  const patient = PHI ? esc(s.patient_name) + '<div class="small">' + esc(s.patient_id) + '</div>' :
    '<span class="hidden">token needed</span>';
  const accession = PHI ? esc(s.accession) : '<span class="hidden">&ndash;</span>';
  const status = esc(s.status) + (s.error ? '<div class="why">' + esc(s.error) + '</div>' : '');
  const open = s.viewer_url ? '<a class="viewer" target="_blank" rel="noreferrer" href="' +
    esc(withToken(s.viewer_url)) + '">open in PACS</a>' : "";
  const rep = s.report_url ? '<a href="' + esc(withToken(s.report_url)) + '"><img class="thumb" src="' +
    esc(withToken(s.report_url)) + '" alt="report"></a>' : "";
  return '<tr class="' + cls.join(" ") + '" data-study-uid="' + esc(s.study_uid) + '">' +
    '<td class="flag">' + flagCell(s) + '</td><td class="num pany">' + fmt(s.p_any) + '</td>' + probs +
    '<td class="patient">' + patient + '</td><td class="accession">' + accession + '</td>' +
    '<td class="arrived" title="' + esc(new Date((s.first_received_s || 0) * 1000).toLocaleString()) + '">' +
    esc(ago(s.age_s)) + '</td><td class="status">' + status + '</td><td class="review">' + reviewCell(s) +
    '</td><td>' + open + '</td><td>' + rep + '</td><td class="notes">' + notes(s) + '</td></tr>';
}
function render(studies) {
  document.querySelector("#worklist tbody").innerHTML = studies.map(row).join("");
  document.getElementById("count").textContent = studies.length + " studies" + (box.checked ? " flagged" : "");
}
async function refresh() {
  try {
    const r = await fetch(withToken("/api/studies" + (box.checked ? "?flagged=1" : "")));
    if (r.ok) render(await r.json());
  } catch (e) {}
}
document.querySelector("#worklist tbody").addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  b.disabled = true;
  await fetch(withToken("/api/studies/" + encodeURIComponent(b.dataset.uid) + "/" + b.dataset.action),
    { method: "POST" });
  refresh();
});
box.addEventListener("change", () => {
  const u = new URL(location.href);
  if (box.checked) u.searchParams.set("flagged", "1"); else u.searchParams.delete("flagged");
  history.replaceState(null, "", u);
  refresh();
});
render(INITIAL);
setInterval(refresh, 2000);
</script></body></html>
"""
