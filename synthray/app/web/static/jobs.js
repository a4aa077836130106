// Live progress on the jobs page: poll the API (the session cookie signs the GET) and
// update the rows in place; a job the page does not show yet reloads it.
(function () {
  "use strict";
  const table = document.getElementById("jobs");
  if (!table) return;
  const live = document.getElementById("live");
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

  function update(row, job) {
    const state = row.querySelector('[data-field="state"]');
    state.textContent = job.state;
    state.className = "state " + job.state;
    const bar = row.querySelector('[data-field="bar"]');
    const total = job.progress.total;
    bar.max = total || 1;
    bar.value = total ? job.progress.step : (job.state === "succeeded" ? 1 : 0);
    row.querySelector('[data-field="count"]').textContent =
      job.progress.step + (total ? " / " + total : "");
    row.querySelector('[data-field="message"]').textContent = job.error || job.progress.message;
  }

  async function poll() {
    try {
      const r = await fetch("/v1/jobs?limit=50", {credentials: "same-origin", cache: "no-store"});
      if (!r.ok) { live.textContent = "Live progress paused (" + r.status + ")."; return; }
      const jobs = await r.json();
      const rows = new Map([...table.querySelectorAll("tr[data-job]")].map(r => [r.dataset.job, r]));
      let unseen = false;
      for (const job of jobs) {
        const row = rows.get(job.id);
        if (row) update(row, job); else if (!TERMINAL.has(job.state) || rows.size === 0) unseen = true;
      }
      if (unseen) { window.location.reload(); return; }
      live.textContent = "Progress updates live while this page is open (last update " +
        new Date().toLocaleTimeString() + ").";
    } catch (e) {
      live.textContent = "Live progress paused: the server did not answer.";
    }
    setTimeout(poll, 2000);
  }
  setTimeout(poll, 2000);
})();
