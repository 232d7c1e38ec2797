// Blind comparisons: the project's current model, a new comparison (two models and a prompts file, or one
// click from a finished job: its model against the current one, on the job's own prompts), and every
// comparison with its win rate and recommendation. `#/comparisons?job=<id>` preselects a job.

import { api } from "../api.js";
import { chatModels, field, fineTuneFiles, pct, select, verdictBadge } from "../feedback.js";
import { ago, cardSection, empty, errorBox, fill, fmtDate, h, poll, toast } from "../ui.js";

export const title = "Comparisons";

export async function render(root, { query, signal }) {
  const currentBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const jobsBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const formBody = h("div");
  const listBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Blind comparisons"), h("p", { class: "muted" }, "People compare two models' answers without knowing which is which; the result decides which model the project serves."))),
    h(
      "div",
      { class: "studio-grid" },
      h("div", {}, listBody),
      h(
        "div",
        {},
        cardSection("current", "Current model", currentBody),
        cardSection("from-job", "Compare a finished job", jobsBody),
        cardSection("new-comparison", "Compare two models", formBody),
      ),
    ),
  );

  const start = async (body) => {
    const made = await api("tunery/v1/comparisons", { method: "POST", body, signal });
    toast("Comparison created: the answers are being written.");
    location.hash = `#/comparisons/${encodeURIComponent(made.id)}`;
  };

  const current = await api("tunery/v1/projects/current_model", { signal });
  fill(
    currentBody,
    current.model ? h("div", { class: "mono", id: "current-model" }, current.model) : h("p", { class: "muted", id: "current-model" }, "None yet: promote one from a comparison."),
    current.history.length ? h("p", { class: "small muted" }, `Promoted ${ago(current.updated_at)}; ${current.history.length} change${current.history.length > 1 ? "s" : ""} so far.`) : null,
  );

  const jobs = (await api("tunery/v1/fine_tuning/jobs?limit=50", { signal })).data.filter((j) => j.status === "succeeded" && j.fine_tuned_model && j.method?.type !== "reward_model");
  const preselected = query.get("job");
  fill(
    jobsBody,
    jobs.length
      ? h(
          "ul",
          { class: "labeller-list" },
          jobs.slice(0, 6).map((job) => {
            const button = h("button", { type: "button", class: job.id === preselected ? "btn btn-primary btn-small" : "btn btn-small", dataset: { job: job.id } }, "Compare blind");
            button.addEventListener("click", async () => {
              button.disabled = true;
              try {
                await start({ job: job.id, max_prompts: 20 });
              } catch (err) {
                toast(err.message, "error");
                button.disabled = false;
              }
            });
            return h(
              "li",
              {},
              h(
                "div",
                { class: "who" },
                h("div", { class: "mono small clip", title: job.fine_tuned_model }, job.fine_tuned_model),
                h("div", { class: "small muted clip", title: job.id }, `${job.method?.type || "supervised"} · from ${job.model} · ${ago(job.finished_at)}`),
              ),
              button,
            );
          }),
        )
      : h("p", { class: "muted" }, "No finished job yet."),
    h("p", { class: "small muted" }, "Its model against the current model (or the model it started from), on up to 20 of its validation (else training) prompts."),
  );

  buildForm(formBody, start, signal).catch((err) => fill(formBody, errorBox(err)));
  poll(async () => {
    const page = await api("tunery/v1/comparisons", { signal });
    fill(listBody, page.data.length ? table(page.data) : empty("No comparisons yet", h("p", { class: "muted" }, "Start one on the right: from a finished job in one click, or any two models.")));
    return true;
  }, 4000, signal);
}

async function buildForm(body, start, signal) {
  const [models, files] = await Promise.all([chatModels(signal), fineTuneFiles(signal)]);
  const candidate = select("cmp-candidate", models.map((m) => [m, m]), { value: models.at(-1) });
  const baseline = select("cmp-baseline", models.map((m) => [m, m]), { value: models[0] });
  const prompts = select("cmp-prompts", files.map((f) => [f.id, `${f.filename} (${f.id})`]), { blank: "Choose a prompts file…" });
  const count = h("input", { id: "cmp-count", type: "number", min: 1, max: 1000, value: 30 });
  const perItem = h("input", { id: "cmp-per-item", type: "number", min: 1, max: 10, value: 1 });
  const errorSlot = h("div");
  const form = h(
    "form",
    {},
    h("div", { class: "form-grid" }, field("Candidate", candidate, null, true), field("Baseline", baseline, null, true), field("Prompts", prompts, null, true), field("Prompts used", count), field("Labels per item", perItem)),
    errorSlot,
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary" }, "Start comparison")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    fill(errorSlot);
    try {
      await start({ candidate: candidate.value, baseline: baseline.value, prompts_file: prompts.value || null, max_prompts: Number(count.value) || 30, labels_per_item: Number(perItem.value) || 1 });
    } catch (err) {
      fill(errorSlot, errorBox(err, "Not started"));
    }
  });
  fill(body, form);
}

function table(rows) {
  return h(
    "div",
    { class: "card table-card" },
    h(
      "table",
      { class: "table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Comparison"), h("th", {}, "Candidate vs baseline"), h("th", { class: "num" }, "Win rate"), h("th", {}, "Verdict"), h("th", {}, "Created"))),
      h(
        "tbody",
        {},
        rows.map((c) => {
          const href = `#/comparisons/${encodeURIComponent(c.id)}`;
          const r = c.result;
          const tr = h(
            "tr",
            { class: "clickable" },
            h("td", {}, h("a", { href, class: "job-link" }, c.name), h("div", { class: "small muted" }, `${c.labels} labels · `, c.status === "generating" ? "writing answers" : `${c.items.ready} items`)),
            h("td", { class: "model-cell" }, h("div", { class: "mono small" }, c.candidate), h("div", { class: "mono small muted" }, "vs ", c.baseline)),
            h("td", { class: "num tabular" }, r.win_rate === null ? "–" : pct(r.win_rate), r.interval ? h("div", { class: "small muted" }, `${pct(r.interval[0])}–${pct(r.interval[1])}`) : null),
            h("td", {}, verdictBadge(r.recommendation, c.promoted)),
            h("td", { title: fmtDate(c.created_at) }, ago(c.created_at)),
          );
          tr.addEventListener("click", (event) => {
            if (!event.target.closest("a, button")) location.hash = href;
          });
          return tr;
        }),
      ),
    ),
  );
}
