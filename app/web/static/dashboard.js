// Live job status: the pages are complete without this; it only refreshes state, stage, progress and
// ETA of the listed jobs from /ui/live/jobs while any of them is still queued or running.
"use strict";
(function () {
  const ENDED = new Set(["succeeded", "failed", "canceled"]);
  const POLL_MS = 1000;

  function eta(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    return seconds < 60 ? Math.round(seconds) + " s" : (seconds / 60).toFixed(1) + " min";
  }

  function update(row, job) {
    const badge = row.querySelector('[data-field="state"] .badge');
    if (badge && badge.textContent !== job.state) {
      badge.textContent = job.state;
      badge.className = "badge " + job.state;
    }
    const stage = row.querySelector('[data-field="stage"]');
    if (stage) stage.textContent = job.stage || "-";
    const bar = row.querySelector('[data-field="percent"] progress');
    if (bar) bar.value = job.percent;
    const pct = row.querySelector('[data-field="percent"] .pct');
    if (pct) pct.textContent = job.percent.toFixed(1) + "%";
    const cell = row.querySelector('[data-field="eta"]');
    if (cell) cell.textContent = eta(job.eta_seconds);
    if (ENDED.has(job.state)) {
      const cancel = row.querySelector("form.inline");
      if (cancel) cancel.remove();
    }
  }

  function watch(table) {
    const rows = new Map();
    table.querySelectorAll("tr[data-job-id]").forEach(function (row) {
      const state = row.querySelector('[data-field="state"] .badge');
      if (state && !ENDED.has(state.textContent.trim())) rows.set(row.dataset.jobId, row);
    });
    if (rows.size === 0) return;
    const reload = table.dataset.reloadOnEnd === "true";

    function poll() {
      const query = Array.from(rows.keys()).map(function (id) { return "id=" + encodeURIComponent(id); });
      fetch(table.dataset.live + "?" + query.join("&"), { credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (body) {
          let ended = false;
          body.jobs.forEach(function (job) {
            const row = rows.get(job.id);
            if (!row) return;
            update(row, job);
            if (ENDED.has(job.state)) { rows.delete(job.id); ended = true; }
          });
          if (ended && reload) { window.location.reload(); return; }
          if (rows.size > 0) setTimeout(poll, POLL_MS);
        })
        .catch(function () { setTimeout(poll, POLL_MS * 5); });  // server restarting: slower retries
    }
    setTimeout(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table[data-live]").forEach(watch);
  });
})();
