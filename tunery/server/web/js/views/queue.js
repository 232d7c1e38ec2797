// One labelling queue, for its admin: answers being written, labels given, the quality of the labels
// (agreement, position and length bias, each labeller's numbers and flags), export to a preference file,
// and one-click training jobs (DPO, KTO, reward model) from the labels. Polled every 3 s while answers
// are being written, every 10 s after (labels keep coming in).

import { api } from "../api.js";
import { bars, chatModels, field, pct, select, statTile } from "../feedback.js";
import { badge, cardSection, copyable, empty, errorBox, fill, fmtDate, fmtNum, h, poll, progressBar, toast } from "../ui.js";

export const title = (params) => `Queue ${params.id}`;

const CHOICE_NAMES = { answer_1: "A better", answer_2: "B better", tie: "tie", both_bad: "both bad", up: "good", down: "bad" };

export async function render(root, { params, signal }) {
  const id = params.id;
  const path = `tunery/v1/feedback/queues/${encodeURIComponent(id)}`;
  const header = h("section", { class: "card job-header" });
  const quality = cardSection("quality", "Quality of the labels", h("p", { class: "muted" }, "Loading…"));
  const exportBody = h("div");
  const itemsBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  root.append(
    h("nav", { class: "breadcrumb", "aria-label": "Breadcrumb" }, h("a", { href: "#/feedback" }, "Feedback studio"), h("span", { "aria-hidden": "true" }, " / "), h("span", { class: "mono" }, id)),
    header,
    quality,
    cardSection("train", "Export and train", exportBody),
    cardSection("items", "Items", itemsBody),
  );

  let queue = await api(path, { signal });
  document.title = `${queue.name} · Tunery`;
  await renderExport(exportBody, queue, signal);
  let slow = 0;
  poll(async () => {
    queue = await api(path, { signal });
    renderHeader(header, queue, path, signal);
    const generating = queue.status === "generating";
    if (generating || Date.now() - slow > 10000) {
      slow = Date.now();
      const [report, items] = await Promise.all([
        queue.labels ? api(`${path}/quality`, { signal }) : null,
        api(`${path}/items?limit=50`, { signal }),
      ]);
      renderQuality(quality, queue, report);
      renderItems(itemsBody, queue, items.data);
    }
    return true;
  }, 3000, signal);
}

function renderHeader(card, q, path, signal) {
  const total = q.items.total;
  const restart = h("button", { type: "button", class: "btn", onclick: async () => {
    try {
      await api(`${path}/generate`, { method: "POST", signal });
      toast("Writing the remaining answers again.");
    } catch (err) {
      toast(err.message, "error");
    }
  } }, "Retry generation");
  fill(
    card,
    h(
      "div",
      { class: "job-title-row" },
      h("div", { class: "job-title" }, h("h1", {}, q.name, badge(q.status)), h("div", { class: "muted" }, `${q.mode === "pairwise" ? "Pairwise comparison" : "Thumbs up/down"} · ${q.labels_per_item} label${q.labels_per_item > 1 ? "s" : ""} per item · created ${fmtDate(q.created_at)}`)),
      h("div", { class: "actions" }, q.status === "failed" && q.items.pending ? restart : null, h("a", { class: "btn btn-primary", href: `#/feedback/${encodeURIComponent(q.id)}/label`, id: "start-labelling" }, "Label this queue")),
    ),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Model A"), q.model_a ? h("dd", { class: "mono" }, q.model_a) : h("dd", {}, "answers imported (POST …/items)"),
      h("dt", {}, "Model B"), q.model_b ? h("dd", { class: "mono" }, q.model_b) : h("dd", {}, q.mode === "pairwise" && q.model_a ? "a second sample of model A" : "–"),
      h("dt", {}, "Answers"), h("dd", {}, `${q.items.ready} of ${total} written`, q.items.failed ? h("span", { class: "muted" }, ` · ${q.items.failed} failed`) : null),
      h("dt", {}, "Labels"), h("dd", {}, `${q.labels} of ${q.labels_needed} · ${q.items_labelled} items labelled`),
    ),
    h(
      "div",
      { class: "job-progress" },
      q.status === "generating" ? h("div", { class: "small muted" }, "Writing answers…") : null,
      progressBar(q.status === "generating" ? q.items.ready : q.labels, q.status === "generating" ? total : q.labels_needed),
    ),
    q.error ? h("div", { class: "alert alert-error" }, h("strong", {}, "Generation: "), q.error) : null,
    q.instructions ? h("p", { class: "muted" }, h("strong", {}, "Instructions: "), q.instructions) : null,
  );
}

function renderQuality(card, q, report) {
  const head = h("h2", { id: "quality-title" }, "Quality of the labels");
  if (!report || !report.labels) {
    fill(card, head, empty("No labels yet", h("p", { class: "muted" }, "Open the queue for labelling, or send labellers their keys: the numbers appear with the first labels.")));
    return;
  }
  const kappa = report.agreement.fleiss_kappa;
  const tiles = [
    statTile("Labels", String(report.labels), `${report.labellers} labeller${report.labellers === 1 ? "" : "s"} · ${report.items_labelled} items`),
    statTile("Agreement (Fleiss' κ)", kappa === null ? "–" : fmtNum(kappa, 2), kappa === null ? "needs items labelled twice" : agreementWord(kappa), kappa !== null && kappa < 0.2 ? "warn" : kappa !== null && kappa >= 0.6 ? "good" : ""),
  ];
  if (report.position_bias) {
    const p = report.position_bias;
    tiles.push(statTile("Left answer wins", pct(p.rate), p.decisive ? `of ${p.decisive} decisive · p = ${fmtNum(p.p_value, 2)}` : "no decisive label yet", p.significant ? "warn" : ""));
    const l = report.length_bias;
    tiles.push(statTile("Longer answer wins", pct(l.rate), l.decisive ? `of ${l.decisive} · p = ${fmtNum(l.p_value, 2)}` : "no pair of different lengths", l.significant ? "warn" : ""));
  } else {
    tiles.push(statTile("Thumbs up", pct(report.up_rate), `of ${report.labels} ratings`));
  }
  const choices = Object.entries(report.choices);
  const most = Math.max(1, ...choices.map(([, n]) => n));
  const people = report.labellers_detail;
  fill(
    card,
    head,
    h("div", { class: "stats" }, tiles),
    report.findings.length ? h("ul", { class: "findings", id: "findings" }, report.findings.map((f) => h("li", {}, f))) : null,
    h(
      "div",
      { class: "two-col quality-charts" },
      h("div", {}, h("h3", {}, "Choices"), bars(choices.map(([c, n]) => [CHOICE_NAMES[c] || c, n, most]), { tone: () => "" })),
      h(
        "div",
        {},
        h("h3", {}, "Agreement with the others' verdict"),
        bars(people.map((p) => [p.name, p.agreement_with_others, 1]), { format: (v) => pct(v), tone: (v) => (v !== null && v < 0.5 ? "warn-fill" : "") }),
      ),
    ),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "table", id: "labellers-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "Labeller"), h("th", { class: "num" }, "Labels"), h("th", { class: "num" }, "Median time"), h("th", { class: "num" }, "Agrees with others"), h("th", { class: "num" }, q.mode === "pairwise" ? "Picks left" : "Thumbs up"), h("th", {}, "Flags"))),
        h(
          "tbody",
          {},
          people.map((p) =>
            h(
              "tr",
              {},
              h("td", {}, p.name),
              h("td", { class: "num tabular" }, p.labels),
              h("td", { class: "num tabular" }, p.median_seconds === null ? "–" : `${fmtNum(p.median_seconds, 2)} s`),
              h("td", { class: "num tabular" }, p.compared_items ? `${pct(p.agreement_with_others)} of ${p.compared_items}` : "–"),
              h("td", { class: "num tabular" }, pct(q.mode === "pairwise" ? p.left_rate : p.up_rate)),
              h("td", {}, p.flags.length ? p.flags.map((f) => h("span", { class: "flag", title: report.rules[f] || "" }, f.replace("_", " "))) : h("span", { class: "muted small" }, "none")),
            ),
          ),
        ),
      ),
    ),
    report.agreement.pairs.length
      ? h("p", { class: "small muted" }, "Cohen's κ per pair: ", report.agreement.pairs.map((p) => `${p.labellers.join(" & ")} ${p.cohen_kappa === null ? "–" : fmtNum(p.cohen_kappa, 2)} (${p.items} shared)`).join(" · "))
      : null,
  );
}

function agreementWord(kappa) {
  if (kappa < 0) return "worse than chance";
  if (kappa < 0.2) return "slight: check the instructions";
  if (kappa < 0.4) return "fair";
  if (kappa < 0.6) return "moderate";
  if (kappa < 0.8) return "substantial";
  return "almost perfect";
}

async function renderExport(body, q, signal) {
  const models = await chatModels(signal).catch(() => []);
  const current = await api("tunery/v1/projects/current_model", { signal }).catch(() => ({ model: null }));
  const start = current.model || q.model_a || models[0];
  const agreement = h("input", { id: "min-agreement", type: "number", min: 0, max: 1, step: 0.05, value: 0 });
  const modelPick = select("train-model", models.map((m) => [m, m]), { value: models.includes(start) ? start : models[0] });
  const result = h("div", { id: "export-result", "aria-live": "polite" });
  const pairwise = q.mode === "pairwise";

  const exportButton = h("button", { type: "button", class: "btn", id: "export-button" }, pairwise ? "Export preferences (DPO format)" : "Export ratings");
  exportButton.addEventListener("click", async () => {
    try {
      const made = await api(`tunery/v1/feedback/queues/${encodeURIComponent(q.id)}/export`, { method: "POST", body: { min_agreement: Number(agreement.value) || 0 }, signal });
      fill(result, h("div", { class: "result-line" }, `${made.counts.lines} lines (${made.format}) in `, copyable(made.file.id), ` · ${summary(made.counts)}`));
    } catch (err) {
      fill(result, errorBox(err, "Nothing exported"));
    }
  });
  const train = (method, label) => {
    const button = h("button", { type: "button", class: method === "dpo" ? "btn btn-primary" : "btn", dataset: { method } }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const made = await api(`tunery/v1/feedback/queues/${encodeURIComponent(q.id)}/train`, { method: "POST", body: { method, model: modelPick.value, min_agreement: Number(agreement.value) || 0 }, signal });
        fill(result, h("div", { class: "result-line" }, `Job `, h("a", { href: `#/jobs/${encodeURIComponent(made.job.id)}`, id: "new-job" }, made.job.id), ` started: ${method.replace("_", " ")} on ${made.counts.lines} lines from `, h("span", { class: "mono" }, made.file.id), "."));
        toast(`Training job ${made.job.id} created.`);
      } catch (err) {
        fill(result, errorBox(err, "No job was started"));
      } finally {
        button.disabled = false;
      }
    });
    return button;
  };
  fill(
    body,
    h("p", { class: "muted" }, "Each item counts once, by the choice most of its labels gave; ties, both-bad answers and items without a majority are left out. ", pairwise ? "DPO and reward models train on the pairs; KTO on the winners (up) and losers (down)." : "Thumbs train KTO."),
    h(
      "div",
      { class: "train-row" },
      field("Start from model", modelPick),
      h("label", { class: "field field-narrow", for: "min-agreement" }, h("span", {}, "Min. agreement"), agreement),
    ),
    h("div", { class: "form-actions" }, exportButton, pairwise ? train("reward_model", "Train reward model") : null, train("kto", "Train KTO"), pairwise ? train("dpo", "Train DPO") : null),
    result,
  );
}

function summary(counts) {
  const skipped = ["conflicts", "ties", "both_bad", "low_agreement", "unlabelled"].filter((k) => counts[k]).map((k) => `${counts[k]} ${k.replace("_", " ")}`);
  return skipped.length ? `left out: ${skipped.join(", ")}` : "nothing left out";
}

function verdictText(item) {
  if (!item.verdict) return item.labels.length ? h("span", { class: "muted" }, "no majority") : "–";
  const model = { answer_1: item.model_1, answer_2: item.model_2 }[item.verdict];
  const answer = { answer_1: "A", answer_2: "B" }[item.verdict];
  return answer ? h("span", {}, `${answer} better`, model ? h("span", { class: "small muted verdict-model" }, model) : null) : CHOICE_NAMES[item.verdict];
}

function renderItems(body, q, items) {
  if (!items.length) {
    fill(body, h("p", { class: "muted" }, "No items yet."));
    return;
  }
  fill(
    body,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "table items-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Prompt"), h("th", {}, q.mode === "pairwise" ? "Answer A (model A)" : "Answer"), q.mode === "pairwise" ? h("th", {}, "Answer B (model B)") : null, h("th", {}, "Labels"), h("th", {}, "Verdict"))),
        h(
          "tbody",
          {},
          items.map((item) =>
            h(
              "tr",
              {},
              h("td", { class: "tabular muted" }, item.position + 1),
              h("td", { class: "clip", title: item.messages.at(-1).content }, item.messages.at(-1).content),
              h("td", { class: "clip", title: item.answer_1 || item.error || "" }, item.status === "ready" ? item.answer_1 : h("span", { class: "muted" }, item.status === "failed" ? `failed: ${item.error}` : "writing…")),
              q.mode === "pairwise" ? h("td", { class: "clip", title: item.answer_2 || "" }, item.answer_2 || "") : null,
              h("td", { class: "tabular" }, item.labels.length),
              h("td", { class: "verdict" }, verdictText(item)),
            ),
          ),
        ),
      ),
    ),
  );
}
