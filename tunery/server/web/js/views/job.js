// One job: its header (status, models, times, progress, pause / resume / cancel), live metric charts,
// checkpoints, events, energy, and the model card. While the job is not finished, everything is polled
// every 2 s; the charts only fetch the metrics logged since the last poll (the metrics cursor).

import { api } from "../api.js";
import { FAMILIES, FamilyChart, MetricTable, loadCharts } from "../chart.js";
import { renderMarkdown } from "../markdown.js";
import {
  ACTIVE,
  TERMINAL,
  ago,
  badge,
  cardSection,
  fill,
  confirmDialog,
  copyButton,
  copyable,
  duration,
  empty,
  errorBox,
  fmtClock,
  fmtDate,
  fmtNum,
  fmtPct,
  h,
  levelBadge,
  poll,
  progressBar,
  toast,
} from "../ui.js";

export const title = (params) => `Job ${params.id}`;

// full-validation numbers exist only for the final model: its row shows them in place of the batch ones
const CHECKPOINT_METRICS = [
  ["train_loss", "train loss", fmtNum],
  ["valid_loss", "valid loss", fmtNum, "full_valid_loss"],
  ["train_mean_token_accuracy", "train acc.", fmtPct],
  ["valid_mean_token_accuracy", "valid acc.", fmtPct, "full_valid_mean_token_accuracy"],
  ["train_reward_mean", "train reward", fmtNum],
  ["valid_reward_mean", "valid reward", fmtNum],
];

// A checkpoint's event keeps the name it was given, the name the checkpoint list shows. Once the checkpoint
// is rotated off disk (a job keeps its newest few) or deleted, that name no longer works: the event says so.
const SNAPSHOT = /with Snapshot ID: (\S+)$/;

function removedNote(message, checkpoints) {
  const match = SNAPSHOT.exec(message);
  if (!match || checkpoints.has_more) return null;
  if (checkpoints.data.some((c) => c.fine_tuned_model_checkpoint === match[1])) return null;
  return h(
    "span",
    {
      class: "muted",
      title: "This checkpoint was rotated off disk (a job keeps its newest few) or deleted: its name no longer works as a model.",
    },
    " (removed)",
  );
}

/** An energy tile: `amount` in `unit` (kWh, kg), or below 1 in its thousandth, `milliUnit` (Wh, g). */
function energyStat(amount, unit, milliUnit, label) {
  const milli = amount * 1000;
  return h(
    "div",
    { class: "stat" },
    h(
      "span",
      { class: "stat-value" },
      milli >= 1000 ? `${fmtNum(amount, 3)} ${unit}` : `${fmtNum(milli, 3)} ${milliUnit}`,
    ),
    h("span", { class: "stat-label" }, label),
  );
}

export async function render(root, { params, signal }) {
  const id = params.id;
  const base = `fine_tuning/jobs/${encodeURIComponent(id)}`;
  const table = new MetricTable();
  const charts = new Map(); // family id -> FamilyChart
  let cursor = 0;
  let job = null;
  let showMetrics = false;
  let summaryAt = 0;
  let cardState = null; // null: not fetched; "missing"; or the markdown text
  let failing = false; // the last poll failed

  const header = h("section", { class: "card job-header" });
  const chartGrid = h("div", { class: "chart-grid" });
  const chartsNote = h("p", { class: "muted chart-note" }, "Charts appear with the first training step.");
  const checkpointsBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const eventsBody = h("ol", { class: "events", "aria-live": "off" });
  const runBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const cardBody = h("div", { class: "markdown" }, h("p", { class: "muted" }, "Loading…"));
  const metricsToggle = h("input", { type: "checkbox", id: "show-metrics" });
  metricsToggle.addEventListener("change", () => {
    showMetrics = metricsToggle.checked;
    timer.now();
  });

  root.append(
    h(
      "nav",
      { class: "breadcrumb", "aria-label": "Breadcrumb" },
      h("a", { href: "#/jobs" }, "Jobs"),
      h("span", { "aria-hidden": "true" }, " / "),
      h("span", { class: "mono" }, id),
    ),
    header,
    h(
      "section",
      { class: "charts", "aria-labelledby": "charts-title" },
      h("h2", { id: "charts-title" }, "Metrics"),
      chartsNote,
      chartGrid,
    ),
    cardSection("ckpt", "Checkpoints", checkpointsBody),
    h(
      "div",
      { class: "two-col" },
      h(
        "section",
        { class: "card section", "aria-labelledby": "events-title" },
        h(
          "div",
          { class: "section-head" },
          h("h2", { id: "events-title" }, "Events"),
          h("label", { class: "check small", for: "show-metrics" }, metricsToggle, " Show step metrics"),
        ),
        eventsBody,
      ),
      cardSection("run", "Energy and run", runBody),
    ),
    h(
      "section",
      { class: "card section", "aria-labelledby": "card-title" },
      h("div", { class: "section-head" }, h("h2", { id: "card-title" }, "Model card")),
      cardBody,
    ),
  );
  signal.addEventListener("abort", () => charts.forEach((c) => c.destroy()));

  async function act(action) {
    if (action === "cancel") {
      const ok = await confirmDialog({
        title: "Cancel this job?",
        body: "Training stops and the job cannot be resumed. Checkpoints saved so far stay usable.",
        confirm: "Cancel job",
        danger: true,
      });
      if (!ok) return;
    }
    try {
      job = { ...job, ...(await api(`v1/${base}/${action}`, { method: "POST", signal })) };
      toast(
        {
          cancel: "Job cancelled.",
          pause: "Pausing: a checkpoint is saved at the end of this step.",
          resume: "Job resumed: it continues from its last checkpoint.",
        }[action],
      );
      renderHeader();
    } catch (err) {
      if (err.name !== "AbortError") toast(err.message, "error");
    }
    timer.now();
  }

  function renderHeader() {
    const s = job.status;
    const hp = job.method?.[job.method?.type]?.hyperparameters || job.hyperparameters || {};
    const { step, total_steps: total, started_at: started } = job.progress || {};
    const shownStep = s === "succeeded" ? total : step;
    const buttons = h(
      "div",
      { class: "actions" },
      h(
        "button",
        {
          type: "button",
          class: "btn",
          disabled: !ACTIVE.includes(s),
          onclick: () => act("pause"),
          "data-action": "pause",
        },
        "Pause",
      ),
      h(
        "button",
        {
          type: "button",
          class: "btn",
          // a failed job whose training process kept dying continues from its checkpoint too
          disabled: !(s === "paused" || (s === "failed" && job.error?.code === "training_process_died")),
          onclick: () => act("resume"),
          "data-action": "resume",
        },
        "Resume",
      ),
      h(
        "button",
        {
          type: "button",
          class: "btn btn-danger-outline",
          disabled: TERMINAL.includes(s),
          onclick: () => act("cancel"),
          "data-action": "cancel",
        },
        "Cancel",
      ),
    );
    const fact = (label, ...value) => [h("dt", {}, label), h("dd", {}, ...value)];
    const etaText = job.estimated_finish
      ? `${ago(job.estimated_finish)} (${fmtClock(job.estimated_finish)})`
      : null;
    fill(
      header,
      h(
        "div",
        { class: "job-title-row" },
        h(
          "div",
          { class: "job-title" },
          h("h1", {}, job.user_provided_suffix || "Fine-tuning job", " ", badge(s)),
          h("div", { class: "copyable-line" }, copyable(job.id)),
        ),
        buttons,
      ),
      job.error && job.error.message
        ? h(
            "div",
            { class: "alert alert-error", role: "alert" },
            h("strong", {}, `Failed: ${job.error.code || "error"}`),
            h("p", {}, job.error.message),
          )
        : null,
      total || (shownStep !== null && shownStep !== undefined) || s === "running"
        ? h(
            "div",
            { class: "job-progress" },
            progressBar(shownStep, total),
            h(
              "div",
              { class: "progress-text" },
              h(
                "span",
                { class: "tabular", "data-testid": "step" },
                `Step ${shownStep ?? 0} of ${total ?? "?"}`,
                total ? ` (${Math.round((100 * (shownStep ?? 0)) / total)}%)` : "",
              ),
              etaText ? h("span", { class: "muted" }, `estimated finish ${etaText}`) : null,
            ),
          )
        : null,
      h(
        "dl",
        { class: "facts" },
        fact("Base model", copyable(job.model)),
        fact(
          "Fine-tuned model",
          job.fine_tuned_model
            ? [
                copyable(job.fine_tuned_model),
                " ",
                h(
                  "a",
                  { class: "small", href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` },
                  "Try in playground",
                ),
                " · ",
                h(
                  "a",
                  { class: "small", href: `#/comparisons?job=${encodeURIComponent(job.id)}` },
                  "Compare blind",
                ),
              ]
            : h("span", { class: "muted" }, s === "succeeded" ? "deleted" : "when the job succeeds"),
        ),
        fact("Method", job.method?.type || "supervised"),
        fact(
          "Hyperparameters",
          h(
            "span",
            { class: "small" },
            `epochs ${hp.n_epochs ?? "auto"} · batch ${hp.batch_size ?? "auto"} · LR × ${hp.learning_rate_multiplier ?? "auto"}`,
            hp.beta !== undefined ? ` · beta ${hp.beta}` : "",
          ),
        ),
        fact("Created", h("span", { title: fmtDate(job.created_at) }, fmtDate(job.created_at))),
        fact("Started", started ? fmtDate(started) : h("span", { class: "muted" }, "–")),
        fact(
          "Finished",
          job.finished_at
            ? [
                fmtDate(job.finished_at),
                started
                  ? h("span", { class: "muted" }, ` (took ${duration(job.finished_at - started)})`)
                  : null,
              ]
            : h("span", { class: "muted" }, "–"),
        ),
        fact(
          "Trained tokens",
          job.trained_tokens ? job.trained_tokens.toLocaleString() : h("span", { class: "muted" }, "–"),
        ),
        fact(
          "Files",
          h("span", { class: "muted" }, "training "),
          h("code", {}, job.training_file),
          job.validation_file
            ? [h("span", { class: "muted" }, " validation "), h("code", {}, job.validation_file)]
            : null,
        ),
      ),
    );
  }

  function renderCharts() {
    for (const family of FAMILIES) {
      if (!family.series.some(([key]) => table.keys.has(key))) continue;
      let chart = charts.get(family.id);
      if (!chart) {
        chart = new FamilyChart(family);
        charts.set(family.id, chart);
        // FAMILIES' order, whatever order the families first show up in (appending moves a node)
        for (const f of FAMILIES) if (charts.has(f.id)) chartGrid.append(charts.get(f.id).card);
      }
      chart.update(table, job?.progress?.total_steps ?? null);
    }
    chartsNote.hidden = charts.size > 0;
    if (!charts.size && job && TERMINAL.includes(job.status))
      chartsNote.textContent = "This job logged no step metrics.";
  }

  function renderCheckpoints(page) {
    const rows = page.data;
    if (!rows.length) {
      fill(
        checkpointsBody,
        h(
          "p",
          { class: "muted" },
          TERMINAL.includes(job.status)
            ? "No checkpoints."
            : "Checkpoints appear as the run saves them (the newest few are kept, and the final model).",
        ),
      );
      return;
    }
    const columns = CHECKPOINT_METRICS.filter(([key]) =>
      rows.some((c) => typeof c.metrics?.[key] === "number"),
    );
    fill(
      checkpointsBody,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table checkpoints-table" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { class: "num" }, "Step"),
              h("th", {}, "Model name"),
              columns.map(([, label]) => h("th", { class: "num" }, label)),
              h("th", {}, "Saved"),
              h("th", {}, ""),
            ),
          ),
          h(
            "tbody",
            {},
            rows.map((c) =>
              h(
                "tr",
                { dataset: { step: c.step_number } },
                h(
                  "td",
                  { class: "num tabular" },
                  c.step_number,
                  c.fine_tuned_model_checkpoint === job.fine_tuned_model
                    ? h("span", { class: "tag" }, "final")
                    : null,
                ),
                h(
                  "td",
                  { class: "ckpt-name" },
                  h(
                    "div",
                    { class: "ckpt-name-inner" },
                    h("code", { title: c.fine_tuned_model_checkpoint }, c.fine_tuned_model_checkpoint),
                    copyButton(c.fine_tuned_model_checkpoint),
                  ),
                ),
                columns.map(([key, , format, full]) => {
                  const value =
                    full && typeof c.metrics?.[full] === "number" ? c.metrics[full] : c.metrics?.[key];
                  return h(
                    "td",
                    {
                      class: "num tabular",
                      title: full && value === c.metrics?.[full] ? "on the whole validation file" : null,
                    },
                    format(value),
                  );
                }),
                h("td", { class: "nowrap", title: fmtDate(c.created_at) }, ago(c.created_at)),
                h(
                  "td",
                  { class: "nowrap" },
                  h(
                    "a",
                    {
                      class: "btn btn-small",
                      href: `#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`,
                    },
                    "Try in playground",
                  ),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  }

  function renderEvents(page, checkpoints) {
    fill(
      eventsBody,
      ...page.data.map((e) =>
        h(
          "li",
          { class: `event event-${e.level}${e.type === "metrics" ? " event-metrics" : ""}` },
          h(
            "time",
            {
              class: "event-time tabular",
              datetime: new Date(e.created_at * 1000).toISOString(),
              title: fmtDate(e.created_at),
            },
            fmtClock(e.created_at),
          ),
          levelBadge(e.level),
          h("span", { class: "event-message" }, e.message),
          removedNote(e.message, checkpoints),
        ),
      ),
    );
    if (!page.data.length) eventsBody.append(h("li", { class: "muted" }, "No events yet."));
  }

  function renderRun(info) {
    const energy = info.energy;
    const rows = [];
    let lead;
    if (energy && typeof energy.kwh === "number") {
      lead = h(
        "div",
        { class: "energy" },
        energyStat(energy.kwh, "kWh", "Wh", "energy used"),
        energyStat(energy.kg_co2e, "kg", "g", "CO₂e emitted"),
      );
      if (!info.final)
        rows.push(["measured", "up to the newest checkpoint; the total comes when the run ends"]);
      rows.push([
        "grid",
        `${energy.country_name || energy.country || "?"}${energy.carbon_intensity_g_per_kwh ? `, ${energy.carbon_intensity_g_per_kwh} g CO₂e/kWh` : ""}`,
      ]);
      if (energy.cpu_power_w !== undefined)
        rows.push([
          "mean power",
          `CPU ${fmtNum(energy.cpu_power_w, 3)} W, RAM ${fmtNum(energy.ram_power_w, 3)} W${energy.gpu_power_w ? `, GPU ${fmtNum(energy.gpu_power_w, 3)} W` : ""}`,
        ]);
      if (energy.duration_s !== undefined) rows.push(["tracked", duration(energy.duration_s)]);
      rows.push(["how", energy.method || "not recorded"]);
    } else if (energy && energy.error) {
      lead = h("p", { class: "muted" }, `Energy not measured: ${energy.error}`);
    } else {
      lead = h(
        "p",
        { class: "muted" },
        info.final
          ? "Energy was not tracked for this run."
          : "Energy is reported at each checkpoint and at the end of the run.",
      );
    }
    const summary = info.summary;
    if (summary) {
      if (summary.wall_seconds !== undefined) rows.push(["wall time", duration(summary.wall_seconds)]);
      if (summary.train_seconds !== undefined) rows.push(["training time", duration(summary.train_seconds)]);
      if (summary.tokens_per_second !== undefined)
        rows.push(["speed", `${fmtNum(summary.tokens_per_second, 4)} tokens/s`]);
      if (summary.peak_memory_mb !== undefined)
        rows.push(["peak memory", `${fmtNum(summary.peak_memory_mb / 1024, 3)} GB`]);
    }
    fill(
      runBody,
      lead,
      rows.length
        ? h(
            "dl",
            { class: "facts facts-compact" },
            rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
          )
        : null,
    );
  }

  async function loadCard() {
    try {
      const text = await api(`tunery/v1/${base}/model_card`, { signal });
      cardState = text;
      // renderMarkdown escapes every piece of the card's text before adding tags (markdown.js)
      cardBody.innerHTML = renderMarkdown(text);
      cardBody.prepend(h("div", { class: "card-tools" }, copyButton(text, "Copy markdown")));
    } catch (err) {
      if (err.name === "AbortError") throw err;
      cardState = "missing";
      fill(
        cardBody,
        h(
          "p",
          { class: "muted" },
          err.status === 404 ? err.message : `Could not load the model card: ${err.message}`,
        ),
      );
    }
  }

  async function fetchMetrics() {
    for (;;) {
      const page = await api(`tunery/v1/${base}/metrics?after=${cursor}`, { signal });
      table.add(page.data);
      cursor = page.cursor;
      if (!page.has_more) return;
    }
  }

  async function refresh() {
    const eventsPath = `tunery/v1/${base}/events?limit=${showMetrics ? 200 : 100}${showMetrics ? "" : "&type=message"}`;
    let fresh;
    let checkpoints;
    let eventsPage;
    try {
      [fresh, checkpoints, eventsPage] = await Promise.all([
        api(`tunery/v1/${base}`, { signal }),
        api(`v1/${base}/checkpoints?limit=100`, { signal }),
        api(eventsPath, { signal }),
        fetchMetrics(),
        loadCharts(),
      ]);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      if (!job) {
        fill(
          root,
          h("nav", { class: "breadcrumb" }, h("a", { href: "#/jobs" }, "Jobs")),
          err.status === 404
            ? empty("No such job", h("p", { class: "muted" }, err.message))
            : errorBox(err, "Could not load the job"),
        );
        return false;
      }
      // once, not every 2 s while the server is away; the page keeps its last good state meanwhile
      if (!failing) toast(`Could not refresh: ${err.message}`, "error");
      failing = true;
      return true;
    }
    failing = false;
    job = fresh;
    renderHeader();
    renderCharts();
    renderCheckpoints(checkpoints);
    renderEvents(eventsPage, checkpoints);
    const finished = TERMINAL.includes(job.status);
    // summary.json only changes at checkpoints and at the end: no need to read it every poll
    if (finished || Date.now() - summaryAt > 10000) {
      summaryAt = Date.now();
      renderRun(await api(`tunery/v1/${base}/summary`, { signal }));
    }
    if (job.status === "succeeded" && cardState === null) await loadCard();
    else if (job.status !== "succeeded" && cardState === null) {
      fill(
        cardBody,
        h(
          "p",
          { class: "muted" },
          finished
            ? "No model card: the job did not succeed."
            : "The model card is written when the job succeeds.",
        ),
      );
    }
    return !finished;
  }

  const timer = poll(refresh, 2000, signal);
}
