// The project's fine-tuning jobs, newest first: status, model, method, progress, age. Refreshed every
// 2 s while a job is active (validating, queued or running), every 15 s otherwise to notice new jobs.

import { api } from "../api.js";
import { ACTIVE, TERMINAL, ago, badge, empty, errorBox, fill, fmtDate, h, poll, progressBar } from "../ui.js";

export const title = "Jobs";

const PAGE = 50;

export async function render(root, { signal }) {
  const body = h("div", { class: "jobs-body" }, h("p", { class: "muted loading" }, "Loading jobs…"));
  const status = h("span", { class: "muted small refresh-note", "aria-live": "polite" });
  root.append(
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        {},
        h("h1", {}, "Fine-tuning jobs"),
        h(
          "p",
          { class: "muted" },
          "Every job of this project. Open one for its charts, events, checkpoints and model card.",
        ),
      ),
      status,
    ),
    body,
  );

  let shown = PAGE;
  let timer = null;

  const refresh = async () => {
    let page;
    try {
      page = await api(`tunery/v1/fine_tuning/jobs?limit=${shown}`, { signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      fill(body, errorBox(err, "Could not load the jobs"));
      return true;
    }
    fill(body, page.data.length ? table(page.data) : noJobs());
    if (page.has_more) {
      body.append(
        h(
          "div",
          { class: "more" },
          h(
            "button",
            { type: "button", class: "btn", onclick: () => ((shown += PAGE), timer.now()) },
            "Show more jobs",
          ),
        ),
      );
    }
    const active = page.data.some((job) => ACTIVE.includes(job.status));
    status.textContent = active ? "Live: updating every 2 s" : "";
    status.classList.toggle("live", active);
    clearTimeout(slow);
    if (!active) slow = setTimeout(() => timer.now(), 15000);
    return active;
  };
  let slow = null;
  signal.addEventListener("abort", () => clearTimeout(slow));
  timer = poll(refresh, 2000, signal);
}

function noJobs() {
  return empty(
    "No jobs yet",
    h(
      "p",
      { class: "muted" },
      "Create one with OpenAI's client pointed at this server; it shows up here as soon as it is created.",
    ),
    h(
      "pre",
      { class: "code-block" },
      'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-tunery-…")\n' +
        'file = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")\n' +
        'client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file.id)',
    ),
  );
}

function table(jobs) {
  return h(
    "div",
    { class: "card table-card" },
    h(
      "table",
      { class: "table jobs-table" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "Status"),
          h("th", {}, "Job"),
          h("th", {}, "Model"),
          h("th", {}, "Method"),
          h("th", { class: "col-progress" }, "Progress"),
          h("th", {}, "Created"),
        ),
      ),
      h("tbody", {}, jobs.map(row)),
    ),
  );
}

function row(job) {
  const href = `#/jobs/${encodeURIComponent(job.id)}`;
  const { step, total_steps: total } = job.progress || {};
  const done = job.status === "succeeded";
  const progress =
    total || step !== null
      ? h(
          "div",
          { class: "progress-cell" },
          progressBar(done ? total : step, total),
          h("span", { class: "small muted tabular" }, `${done ? total : (step ?? 0)} / ${total ?? "?"}`),
        )
      : h("span", { class: "muted small" }, TERMINAL.includes(job.status) ? "–" : "not started");
  const link = h("a", { href, class: "job-link" }, job.user_provided_suffix || job.id);
  const tr = h(
    "tr",
    { class: "clickable", dataset: { job: job.id } },
    h("td", {}, badge(job.status)),
    h("td", {}, link, job.user_provided_suffix ? h("div", { class: "small muted mono" }, job.id) : null),
    h(
      "td",
      { class: "model-cell" },
      h("div", { class: "mono" }, job.model),
      job.fine_tuned_model
        ? h("div", { class: "small mono ft-name", title: job.fine_tuned_model }, "→ ", job.fine_tuned_model)
        : null,
    ),
    h("td", {}, job.method?.type || "supervised"),
    h("td", {}, progress),
    h("td", { title: fmtDate(job.created_at) }, ago(job.created_at)),
  );
  // the whole row opens the job; the link inside stays the keyboard and middle-click target
  tr.addEventListener("click", (event) => {
    if (event.target.closest("a, button") || window.getSelection()?.toString()) return;
    location.hash = href;
  });
  return tr;
}
