// Labelling, by keyboard: the prompt on top, two answers side by side as A (left) and B (right), models
// never named. A or 1: A is better; B or 2: B is better; T: tie; X: both bad; C: comment (Enter keeps it);
// U: undo (back to the previous item, to change its label). Thumbs mode: ↑ or 1 up, ↓ or 2 down.
// A choice is saved at once (POST .../labels) and the next item follows; closing the page loses nothing.

import { api } from "../api.js";
import { promptTurns } from "../feedback.js";
import { clear, errorBox, fill, h, progressBar } from "../ui.js";

export const title = "Label";

const PAIR_KEYS = { a: "left", 1: "left", b: "right", 2: "right", t: "tie", x: "both_bad" };
const THUMB_KEYS = { arrowup: "up", 1: "up", "+": "up", arrowdown: "down", 2: "down", "-": "down" };
const PAIR_CHOICES = [
  ["left", "A is better", "A"],
  ["tie", "Tie", "T"],
  ["both_bad", "Both bad", "X"],
  ["right", "B is better", "B"],
];
const THUMB_CHOICES = [
  ["up", "Good answer", "↑"],
  ["down", "Bad answer", "↓"],
];

export async function render(root, { params, signal }) {
  const queueId = params.id;
  const base = `tunery/v1/feedback`;
  let queue = null;
  let item = null; // the item shown
  let reviewing = false; // an earlier item, brought back by undo
  let busy = false;
  let shownAt = performance.now();
  const history = []; // ids of the items labelled on this page, newest last (for undo)

  const heading = h("h1", {}, "Labelling");
  const progressSlot = h("div", { class: "label-progress" });
  const instructions = h("p", { class: "instructions-line", hidden: true });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const status = h("div", { class: "label-status", role: "status", "aria-live": "polite" });
  const comment = h("input", { id: "label-comment", type: "text", maxlength: 4000, placeholder: "Comment (optional): press C, type, Enter" });
  const page = h(
    "div",
    { class: "label-page" },
    h("div", { class: "label-head" }, h("a", { href: "#/feedback", class: "btn btn-ghost btn-small" }, "← Queues"), heading, progressSlot),
    instructions,
    body,
    status,
  );
  root.append(page);

  function showProgress(p) {
    const total = p.labelled_by_me + p.left_for_me;
    fill(progressSlot, progressBar(p.labelled_by_me, total), h("span", { class: "small muted tabular nowrap", id: "label-count" }, `${p.labelled_by_me} / ${total} done`));
  }

  async function next() {
    const answer = await api(`${base}/queues/${encodeURIComponent(queueId)}/next`, { signal });
    queue = answer.queue;
    heading.textContent = queue.name;
    instructions.textContent = queue.instructions;
    instructions.hidden = !queue.instructions;
    showProgress(answer.progress);
    reviewing = false;
    show(answer.item, null);
  }

  function show(shownItem, currentChoice) {
    item = shownItem;
    comment.value = item?.label?.comment || "";
    shownAt = performance.now();
    if (!item) {
      status.textContent = "";
      fill(
        body,
        h(
          "div",
          { class: "card done-card", id: "label-done" },
          h("h2", {}, "All done here"),
          h("p", { class: "muted" }, "Every item of this queue that needs you has your label. Thank you!"),
          h("div", { class: "actions" }, h("a", { class: "btn", href: "#/feedback" }, "Back to the queues"), history.length ? h("button", { type: "button", class: "btn", onclick: undo }, "Undo the last one (U)") : null),
        ),
      );
      return;
    }
    const pairwise = queue.mode === "pairwise";
    const answers = pairwise
      ? h("div", { class: "answers" }, answerCard("A", "left", item.left, currentChoice), answerCard("B", "right", item.right, currentChoice))
      : h("div", { class: "answers answers-one" }, answerCard(null, "answer", item.answer, currentChoice));
    const choices = pairwise ? PAIR_CHOICES : THUMB_CHOICES;
    fill(
      body,
      reviewing ? h("div", { class: "alert alert-info", role: "status" }, "Changing an earlier label: choose again, or press Enter in the comment to keep the choice with a new comment.") : null,
      h("section", { class: "card prompt-card", "aria-label": "Prompt", id: "label-prompt" }, promptTurns(item.messages)),
      answers,
      h(
        "div",
        { class: pairwise ? "choice-bar" : "choice-bar choice-bar-two" },
        choices.map(([value, label, key]) =>
          h(
            "button",
            { type: "button", class: `btn choice choice-${value}${currentChoice === value ? " selected" : ""}`, dataset: { choice: value }, onclick: () => choose(value) },
            h("span", {}, label),
            h("kbd", {}, key),
          ),
        ),
      ),
      h("div", { class: "comment-row" }, comment),
      h(
        "div",
        { class: "key-help", "aria-hidden": "true" },
        pairwise
          ? [h("span", {}, h("kbd", {}, "A"), "/", h("kbd", {}, "1"), " left better"), h("span", {}, h("kbd", {}, "B"), "/", h("kbd", {}, "2"), " right better"), h("span", {}, h("kbd", {}, "T"), " tie"), h("span", {}, h("kbd", {}, "X"), " both bad")]
          : [h("span", {}, h("kbd", {}, "↑"), "/", h("kbd", {}, "1"), " good"), h("span", {}, h("kbd", {}, "↓"), "/", h("kbd", {}, "2"), " bad")],
        h("span", {}, h("kbd", {}, "C"), " comment"),
        h("span", {}, h("kbd", {}, "U"), " undo"),
      ),
    );
  }

  function answerCard(letter, side, text, currentChoice) {
    const chosen = currentChoice === side || (currentChoice === "up" && side === "answer") ? " chosen" : "";
    return h(
      "article",
      { class: `card answer${chosen}`, dataset: { side }, "aria-label": letter ? `Answer ${letter}` : "Answer" },
      h("div", { class: "answer-head" }, letter ? h("span", { class: "answer-letter" }, letter) : null, h("strong", {}, letter ? `Answer ${letter}` : "Answer")),
      h("div", { class: "answer-body" }, text),
    );
  }

  async function choose(choice) {
    if (busy || !item) return;
    busy = true;
    for (const button of body.querySelectorAll(".choice")) button.classList.toggle("selected", button.dataset.choice === choice);
    const seconds = Math.round((performance.now() - shownAt) / 100) / 10;
    const labelled = item;
    try {
      const payload = { choice, seconds };
      if (comment.value.trim()) payload.comment = comment.value.trim();
      await api(`${base}/items/${encodeURIComponent(labelled.id)}/labels`, { method: "POST", body: payload, signal });
      if (history[history.length - 1] !== labelled.id) history.push(labelled.id);
      status.textContent = reviewing ? "Label changed." : "Saved.";
      status.className = "label-status saved";
      await next();
    } catch (err) {
      if (err.name === "AbortError") return;
      status.className = "label-status";
      fill(status, errorBox(err, "Not saved: try again"));
    } finally {
      busy = false;
    }
  }

  async function undo() {
    if (busy || !history.length) return;
    const previous = reviewing && item ? history[history.indexOf(item.id) - 1] : history[history.length - 1];
    if (!previous) return;
    busy = true;
    try {
      const earlier = await api(`${base}/items/${encodeURIComponent(previous)}`, { signal });
      reviewing = true;
      show(earlier, earlier.label?.choice ?? null);
      status.className = "label-status";
      status.textContent = `Back to an earlier item (your label: ${describe(earlier.label?.choice)}).`;
    } catch (err) {
      if (err.name !== "AbortError") fill(status, errorBox(err, "Could not go back"));
    } finally {
      busy = false;
    }
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target === comment) {
      if (event.key === "Enter") {
        event.preventDefault();
        comment.blur();
        if (reviewing && item?.label) choose(item.label.choice);
        else status.textContent = comment.value.trim() ? "Comment kept: now choose, it is saved with your choice." : "";
      } else if (event.key === "Escape") comment.blur();
      return;
    }
    if (event.target.closest?.("input, textarea, select, [contenteditable]")) return;
    const key = event.key.toLowerCase();
    if (key === "u") return (event.preventDefault(), undo());
    if (key === "c" && item) return (event.preventDefault(), comment.focus());
    const choice = (queue?.mode === "thumbs" ? THUMB_KEYS : PAIR_KEYS)[key];
    if (choice && item) {
      event.preventDefault();
      choose(choice);
    }
  }
  document.addEventListener("keydown", onKey);
  signal.addEventListener("abort", () => document.removeEventListener("keydown", onKey));

  try {
    await next();
  } catch (err) {
    if (err.name === "AbortError") throw err;
    clear(body).append(errorBox(err, "This queue could not be opened"));
  }
}

function describe(choice) {
  return { left: "A better", right: "B better", tie: "tie", both_bad: "both bad", up: "good", down: "bad" }[choice] || "none";
}
