// One blind comparison: the candidate's win rate over decisive items with its 95% interval drawn against
// 50%, wins / losses / ties, the recommendation and its reason, and the promote button (the candidate
// becomes the project's current model). Polled every 3 s: labels keep coming in.

import { api } from "../api.js";
import { pct, statTile, verdictBadge } from "../feedback.js";
import { confirmDialog, fill, fmtDate, h, poll, progressBar, toast } from "../ui.js";

export const title = (params) => `Comparison ${params.id}`;

export async function render(root, { params, signal }) {
  const id = params.id;
  const card = h("section", { class: "card job-header" }, h("p", { class: "muted" }, "Loading…"));
  const resultCard = h("section", { class: "card section", "aria-labelledby": "result-title" });
  root.append(
    h("nav", { class: "breadcrumb", "aria-label": "Breadcrumb" }, h("a", { href: "#/comparisons" }, "Comparisons"), h("span", { "aria-hidden": "true" }, " / "), h("span", { class: "mono" }, id)),
    card,
    resultCard,
  );
  let promoting = false;
  const timer = poll(async () => {
    const c = await api(`tunery/v1/comparisons/${encodeURIComponent(id)}`, { signal });
    document.title = `${c.name} · Tunery`;
    const promote = h("button", { type: "button", class: c.result.recommendation === "promote" ? "btn btn-primary" : "btn", id: "promote", disabled: c.promoted || promoting }, c.promoted ? "Current model" : "Promote the candidate");
    promote.addEventListener("click", async () => {
      const rec = c.result.recommendation;
      const advice = rec === "promote" ? "The labels favour it." : rec === "review_safety" ? `The labels favour it, but its training run raised safety flags: ${c.result.safety_flags.join("; ")}.` : `The labels do not support it yet (${rec.replace("_", " ")}).`;
      const sure = await confirmDialog({ title: "Make the candidate the current model?", body: `${c.candidate} becomes the project's current model. ${advice}`, confirm: "Promote" });
      if (!sure) return;
      promoting = true;
      try {
        await api("tunery/v1/projects/current_model", { method: "POST", body: { model: c.candidate, comparison_id: c.id }, signal });
        toast("Promoted: it is now the project's current model.");
      } catch (err) {
        toast(err.message, "error");
      } finally {
        promoting = false;
        timer.now();
      }
    });
    fill(
      card,
      h(
        "div",
        { class: "job-title-row" },
        h("div", { class: "job-title" }, h("h1", {}, c.name, verdictBadge(c.result.recommendation, c.promoted)), h("div", { class: "muted" }, `Created ${fmtDate(c.created_at)} · ${c.labels_per_item} label${c.labels_per_item > 1 ? "s" : ""} per item`)),
        h("div", { class: "actions" }, h("a", { class: "btn", href: `#/feedback/${encodeURIComponent(c.id)}/label`, id: "label-comparison" }, "Label it"), promote),
      ),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Candidate"), h("dd", { class: "mono" }, c.candidate),
        h("dt", {}, "Baseline"), h("dd", { class: "mono" }, c.baseline),
        h("dt", {}, "Answers"), h("dd", {}, `${c.items.ready} of ${c.items.total} items written`, c.items.failed ? ` · ${c.items.failed} failed` : ""),
        h("dt", {}, "Current model"), h("dd", { class: "mono" }, c.current_model || "none yet"),
      ),
      c.status === "generating" ? h("div", { class: "job-progress" }, h("div", { class: "small muted" }, "Writing answers…"), progressBar(c.items.ready, c.items.total)) : null,
      c.error ? h("div", { class: "alert alert-error" }, c.error) : null,
    );
    renderResult(resultCard, c);
    return true;
  }, 3000, signal);
}

function renderResult(card, c) {
  const r = c.result;
  const head = h("h2", { id: "result-title" }, "Result");
  if (!r.decisive) {
    fill(card, head, h("p", { class: "muted" }, r.reason), r.ties || r.both_bad ? h("p", { class: "muted" }, `${r.ties} ties, ${r.both_bad} both bad so far.`) : null);
    return;
  }
  const [low, high] = r.interval;
  const band = h("div", { class: "interval-band" });
  band.style.left = `${low * 100}%`;
  band.style.width = `${(high - low) * 100}%`;
  const point = h("div", { class: "interval-point" });
  point.style.left = `${r.win_rate * 100}%`;
  const half = h("div", { class: "interval-half", title: "50%: no difference" });
  half.style.left = "50%";
  fill(
    card,
    head,
    h(
      "div",
      { class: "two-col" },
      h(
        "div",
        {},
        h("div", { class: "big-number", id: "win-rate" }, pct(r.win_rate)),
        h("div", { class: "muted" }, `the candidate's win rate over ${r.decisive} decisive item${r.decisive > 1 ? "s" : ""}; 95% interval ${pct(low)} to ${pct(high)}`),
        h("div", { class: "interval", role: "img", "aria-label": `Win rate ${pct(r.win_rate)}, 95% interval ${pct(low)} to ${pct(high)}` }, h("div", { class: "interval-track" }), band, half, point),
        h("div", { class: "interval-scale", "aria-hidden": "true" }, h("span", {}, "0%"), h("span", {}, "50%"), h("span", {}, "100%")),
        h("p", { class: "reason" }, r.reason),
      ),
      h(
        "div",
        { class: "stats" },
        statTile("Candidate better", String(r.wins), "items", r.wins > r.losses ? "good" : ""),
        statTile("Baseline better", String(r.losses), "items"),
        statTile("Ties", String(r.ties), `${r.both_bad} both bad`),
        statTile("No majority", String(r.conflicts), `${r.unlabelled} unlabelled`),
      ),
    ),
  );
}
