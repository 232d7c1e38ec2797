// Live metric charts (uPlot, vendor/). A job's metrics records are merged by step into one table, and
// each family of metrics that the records hold gets a chart: step on the x axis, fixed to the job's total
// steps so the line visibly grows across the chart while the job runs; training, validation and
// full-validation series in the same three colours on every chart; values under the cursor in the legend.

import { fmtNum, fmtPct, h } from "./ui.js";

let library = null;

/** uPlot, loaded on first use: only the job page draws charts, so the other pages never fetch its 50 KB. */
export function loadCharts() {
  const fetched = (el) =>
    new Promise((resolve, reject) => {
      el.addEventListener("load", resolve);
      el.addEventListener("error", () =>
        reject(new Error(`Could not load the chart library (${el.src || el.href}).`)),
      );
      document.head.append(el);
    });
  library ??= Promise.all([
    fetched(h("link", { rel: "stylesheet", href: "web/vendor/uPlot.min.css" })),
    fetched(h("script", { src: "web/vendor/uPlot.iife.min.js" })),
  ]).then(
    () => window.uPlot,
    (err) => {
      library = null; // the next page that needs it tries again
      throw err;
    },
  );
  return library;
}

// Okabe-Ito based: distinguishable with the common colour-vision deficiencies, and on white
export const COLORS = { train: "#0b63c4", valid: "#d55e00", full: "#8a3ffc", other: "#008a6e" };

const pct = (v) => fmtPct(v);
const sci = (v) => (v === null || v === undefined ? "–" : v === 0 ? "0" : v.toExponential(2));

// [metric key, legend label, role]; a job has one naming scheme, so only the keys present are drawn
export const FAMILIES = [
  {
    id: "loss",
    title: "Loss",
    unit: "lower is better",
    series: [
      ["train_loss", "train", "train"],
      ["valid_loss", "validation", "valid"],
      ["full_valid_loss", "full validation", "full"],
    ],
  },
  {
    id: "accuracy",
    title: "Accuracy",
    unit: "share correct (tokens, or pairs for a reward model)",
    format: pct,
    series: [
      ["train_mean_token_accuracy", "train", "train"],
      ["valid_mean_token_accuracy", "validation", "valid"],
      ["full_valid_mean_token_accuracy", "full validation", "full"],
      ["train_accuracy", "train", "train"],
      ["valid_accuracy", "validation", "valid"],
      ["full_valid_accuracy", "full validation", "full"],
    ],
  },
  {
    id: "reward",
    title: "Reward",
    unit: "mean grader score per completion, higher is better",
    series: [
      ["train_reward_mean", "train", "train"],
      ["valid_reward_mean", "validation", "valid"],
      ["full_valid_reward_mean", "full validation", "full"],
      ["train_score_mean", "train score", "other"],
      ["valid_score_mean", "validation score", "valid"],
    ],
  },
  {
    id: "preference",
    title: "Preference accuracy",
    unit: "share of pairs where the chosen answer gets the higher implicit reward",
    format: pct,
    series: [
      ["rewards/accuracies", "train", "train"],
      ["valid_rewards/accuracies", "validation", "valid"],
      ["full_valid_rewards/accuracies", "full validation", "full"],
    ],
  },
  {
    id: "margin",
    title: "Reward margin",
    unit: "chosen minus rejected reward, higher is better",
    series: [
      ["rewards/margins", "train", "train"],
      ["valid_rewards/margins", "validation", "valid"],
      ["full_valid_rewards/margins", "full validation", "full"],
      ["train_margin", "train", "train"],
      ["valid_margin", "validation", "valid"],
      ["full_valid_margin", "full validation", "full"],
    ],
  },
  {
    id: "kl",
    title: "KL divergence from the reference",
    unit: "nats; how far the policy has moved",
    series: [
      ["kl", "train", "train"],
      ["valid_kl", "validation", "valid"],
    ],
  },
  {
    id: "lr",
    title: "Learning rate",
    unit: "per optimizer step (warmup, then the schedule)",
    format: sci,
    smooth: false,
    series: [["lr", "learning rate", "other"]],
  },
];

/** Metrics records (several may share a step: the full-validation record follows its step's record). */
export class MetricTable {
  constructor() {
    this.byStep = new Map();
    this.keys = new Set();
  }

  add(records) {
    for (const record of records) {
      if (typeof record.step !== "number") continue;
      const row = this.byStep.get(record.step) || {};
      Object.assign(row, record);
      this.byStep.set(record.step, row);
      for (const key of Object.keys(record)) this.keys.add(key);
    }
  }

  get size() {
    return this.byStep.size;
  }

  /** uPlot's column layout: [steps, values of key 1, values of key 2, ...] with nulls for gaps. */
  columns(keys) {
    const steps = [...this.byStep.keys()].sort((a, b) => a - b);
    const rows = steps.map((s) => this.byStep.get(s));
    return [steps, ...keys.map((key) => rows.map((row) => (typeof row[key] === "number" ? row[key] : null)))];
  }
}

function axisStyle(format) {
  return {
    stroke: "#4a5563",
    grid: { stroke: "#e8ebef", width: 1 },
    ticks: { stroke: "#d5dae1", width: 1 },
    font: "12px system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif",
    labelFont: "600 12px system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif",
    values: format ? (_u, values) => values.map(format) : undefined,
  };
}

// With the cursor off the chart the legend shows each series' newest value: a live read-out of the run.
function latest(column) {
  for (let i = column.length - 1; i >= 0; i--)
    if (column[i] !== null && column[i] !== undefined) return column[i];
  return null;
}

function legendValue(format) {
  return (u, v, sidx, idx) => format(idx === null || idx === undefined ? latest(u.data[sidx]) : v);
}

// Per-step training numbers are noisy (a batch of one example at a time): the raw line is drawn faint
// and an exponential moving average (debiased, as TensorBoard's smoothing) solid on top of it.
function smoothed(column) {
  const n = column.filter((v) => v !== null).length;
  const weight = Math.min(0.95, Math.max(0.6, 1 - 15 / Math.max(n, 1)));
  let ema = 0;
  let seen = 0;
  return column.map((v) => {
    if (v === null) return null;
    ema = ema * weight + (1 - weight) * v;
    seen += 1;
    return ema / (1 - weight ** seen);
  });
}

/** The series drawn for the metrics present: a training series becomes a faint raw and a smoothed line. */
function expand(present, family) {
  return present.flatMap(([key, label, role]) =>
    role === "train" && family.smooth !== false
      ? [
          [key, label, "raw"],
          [key, `${label}, smoothed`, "train", true],
        ]
      : [[key, label, role]],
  );
}

function seriesStyle([key, label, role], format) {
  const color = role === "raw" ? "rgba(11, 99, 196, 0.3)" : COLORS[role];
  const base = {
    label,
    stroke: color,
    width: role === "raw" ? 1 : 2.25,
    value: legendValue(format || fmtNum),
    spanGaps: true,
    key,
  };
  if (role === "full") {
    // measured once per epoch or at the end: points, not a line
    return {
      ...base,
      width: 0,
      paths: () => null,
      points: { show: true, size: 9, stroke: color, fill: color },
    };
  }
  if (role === "valid")
    return { ...base, points: { show: true, size: 6, stroke: color, fill: "#fff", width: 2 } };
  return { ...base, points: { show: false } };
}

/** The card of one family's chart; `update(table, totalSteps)` redraws it with the table's rows. */
export class FamilyChart {
  constructor(family) {
    this.family = family;
    this.keys = [];
    this.plot = null;
    this.totalSteps = null;
    this.body = h("div", { class: "chart-body" });
    this.card = h(
      "section",
      {
        class: "card chart-card",
        dataset: { family: family.id, points: "0" },
        "aria-label": `${family.title} chart`,
      },
      h(
        "div",
        { class: "chart-head" },
        h("h3", {}, family.title),
        h("span", { class: "muted small" }, family.unit),
      ),
      this.body,
    );
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resize.observe(this.body);
  }

  size() {
    const width = Math.max(260, Math.floor(this.body.clientWidth || 480));
    return { width, height: width >= 900 ? 190 : width < 480 ? 200 : 250 }; // a full-row chart is a strip
  }

  present(table) {
    return this.family.series.filter(([key]) => table.keys.has(key));
  }

  update(table, totalSteps) {
    const present = this.present(table);
    if (!present.length) return false;
    const drawn = expand(present, this.family);
    const keys = present.map(([key]) => key);
    if (!this.plot || keys.join() !== this.keys.join() || totalSteps !== this.totalSteps)
      this.build(drawn, totalSteps);
    const columns = table.columns(keys);
    const byKey = new Map(keys.map((key, i) => [key, columns[i + 1]]));
    const data = [
      columns[0],
      ...drawn.map(([key, , , smooth]) => (smooth ? smoothed(byKey.get(key)) : byKey.get(key))),
    ];
    this.plot.setData(data);
    if (!(this.plot.cursor.left >= 0)) this.plot.setLegend({ idx: null }); // not hovering: newest values
    // how many steps have a value drawn: what the browser tests watch grow
    const points = data
      .slice(1)
      .reduce((most, column) => Math.max(most, column.filter((v) => v !== null).length), 0);
    this.card.dataset.points = String(points);
    return true;
  }

  build(drawn, totalSteps) {
    this.plot?.destroy();
    this.keys = [...new Set(drawn.map(([key]) => key))];
    this.totalSteps = totalSteps;
    const format = this.family.format;
    const options = {
      ...this.size(),
      scales: {
        x: {
          time: false,
          range: (_u, min, max) => [Math.min(min ?? 0, 0), Math.max(max ?? 1, totalSteps || 0, 1)],
        },
        y: { range: (_u, min, max) => padded(min, max) },
      },
      axes: [
        {
          ...axisStyle(),
          label: "step",
          labelSize: 18,
          values: (_u, values) => values.map((v) => fmtNum(v)),
        },
        { ...axisStyle(format), size: 64 },
      ],
      series: [
        {
          label: "step",
          value: (u, v, _s, idx) =>
            idx === null || idx === undefined ? `${fmtNum(latest(u.data[0]))} (latest)` : fmtNum(v),
        },
        ...drawn.map((s) => seriesStyle(s, format)),
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false }, points: { size: 7 } },
    };
    this.plot = new window.uPlot(options, [[], ...drawn.map(() => [])], this.body);
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
  }
}

function padded(min, max) {
  if (min === null || max === null || min === undefined || max === undefined) return [0, 1];
  if (min === max) {
    const pad = Math.abs(min) * 0.1 || 0.5;
    return [min - pad, max + pad];
  }
  const pad = (max - min) * 0.08;
  return [min - pad, max + pad];
}
