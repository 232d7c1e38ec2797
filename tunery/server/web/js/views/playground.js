// Chat with any model the key can use (base models, fine-tuned models, checkpoints), streamed as it is
// generated. Compare mode puts a second model beside the first: each prompt goes to both at once, and
// each side keeps its own conversation (its own earlier answers), as two separate chats would.
// The selection lives in the URL (#/playground?model=A&compare=B) so a checkpoint's "try" link opens here.

import { api, streamChat } from "../api.js";
import { errorBox, fill, fmtNum, h } from "../ui.js";

export const title = "Playground";

function groupModels(models) {
  const base = models.filter((m) => m.owned_by === "system" || !m.id.startsWith("ft:"));
  const tuned = models.filter((m) => m.id.startsWith("ft:") && !/:ckpt-step-\d+$/.test(m.id));
  const checkpoints = models.filter((m) => /:ckpt-step-\d+$/.test(m.id));
  return [
    ["Base models", base],
    ["Fine-tuned models", tuned],
    ["Checkpoints", checkpoints],
  ].filter(([, list]) => list.length);
}

function modelSelect(id, groups, selected) {
  const select = h(
    "select",
    { id, class: "model-select" },
    groups.map(([label, list]) =>
      h(
        "optgroup",
        { label },
        list.map((m) => h("option", { value: m.id, selected: m.id === selected }, m.id)),
      ),
    ),
  );
  if (selected && !groups.some(([, list]) => list.some((m) => m.id === selected))) {
    // a model from the URL that this project cannot see (or was deleted): say so instead of swapping it
    select.prepend(h("option", { value: selected, selected: true }, `${selected} (not available)`));
  }
  return select;
}

/** One side of the chat: a model, its conversation, and the transcript on screen. */
class Pane {
  constructor(label, select) {
    this.select = select;
    this.messages = [];
    this.log = h(
      "div",
      { class: "transcript", "aria-live": "polite" },
      h("p", { class: "muted transcript-empty" }, "Send a prompt to start."),
    );
    this.el = h(
      "section",
      { class: "card pane", "aria-label": `${label} model` },
      h("div", { class: "pane-head" }, h("label", { for: select.id, class: "pane-label" }, label), select),
      this.log,
    );
  }

  get model() {
    return this.select.value;
  }

  reset() {
    this.messages = [];
    fill(this.log, h("p", { class: "muted transcript-empty" }, "Send a prompt to start."));
  }

  addUser(text) {
    this.log.querySelector(".transcript-empty")?.remove();
    this.messages.push({ role: "user", content: text });
    this.log.append(h("div", { class: "msg msg-user" }, h("div", { class: "bubble" }, text)));
    this.scroll();
  }

  async answer(settings, signal) {
    const text = h("div", { class: "bubble bubble-pending" });
    const meta = h("div", { class: "msg-meta muted small" }, "waiting for the model…");
    const item = h(
      "div",
      { class: "msg msg-assistant", dataset: { model: this.model } },
      h("div", { class: "msg-model small muted mono" }, this.model),
      text,
      meta,
    );
    this.log.append(item);
    this.scroll();
    const messages = settings.system
      ? [{ role: "system", content: settings.system }, ...this.messages]
      : [...this.messages];
    const started = performance.now();
    let first = null;
    let content = "";
    let usage = null;
    let finish = null;
    try {
      for await (const chunk of streamChat(
        { model: this.model, messages, temperature: settings.temperature, max_tokens: settings.maxTokens },
        signal,
      )) {
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta?.content) {
            first ??= performance.now();
            content += choice.delta.content;
            text.textContent = content;
            text.classList.remove("bubble-pending");
            this.scroll();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      item.dataset.done = "true";
    } catch (err) {
      item.dataset.done = "error";
      if (err.name === "AbortError") finish = "stopped";
      else {
        item.append(errorBox(err, "The model could not answer"));
        meta.textContent = "";
        text.remove();
        this.messages.pop(); // so a retry does not send the failed turn twice
        return;
      }
    }
    text.classList.remove("bubble-pending");
    if (!content)
      text.append(h("span", { class: "muted" }, finish === "stopped" ? "(stopped)" : "(empty answer)"));
    this.messages.push({ role: "assistant", content });
    const seconds = (performance.now() - started) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens (prompt ${usage.prompt_tokens})`);
    parts.push(`${fmtNum(seconds, 2)} s`);
    if (first !== null) parts.push(`first token ${fmtNum((first - started) / 1000, 2)} s`);
    if (usage && seconds > 0) parts.push(`${fmtNum(usage.completion_tokens / seconds, 3)} tokens/s`);
    if (finish) parts.push(finish === "length" ? "stopped at max tokens" : `finish: ${finish}`);
    meta.textContent = parts.join(" · ");
    this.scroll();
  }

  scroll() {
    this.log.scrollTop = this.log.scrollHeight;
  }
}

export async function render(root, { query, signal }) {
  root.append(h("p", { class: "muted" }, "Loading models…"));
  let models;
  try {
    models = (await api("v1/models", { signal })).data;
  } catch (err) {
    if (err.name === "AbortError") throw err;
    fill(root, errorBox(err, "Could not list the models"));
    return;
  }
  const groups = groupModels(models);
  const first = query.get("model") || models[0]?.id || "";
  const second = query.get("compare") || models.find((m) => m.id !== first)?.id || first;

  const panes = [
    new Pane("Model", modelSelect("model-a", groups, first)),
    new Pane("Compare with", modelSelect("model-b", groups, second)),
  ];
  const compare = h("input", { type: "checkbox", id: "compare", checked: query.has("compare") });
  const system = h("textarea", {
    id: "system",
    rows: 2,
    placeholder: "e.g. You are a helpful support agent. Be brief.",
  });
  const temperature = h("input", {
    id: "temperature",
    type: "number",
    min: 0,
    max: 2,
    step: 0.1,
    value: "0.7",
  });
  const maxTokens = h("input", {
    id: "max-tokens",
    type: "number",
    min: 1,
    max: 4096,
    step: 1,
    value: "128",
  });
  const prompt = h("textarea", {
    id: "prompt",
    rows: 2,
    placeholder: "Ask something… (Enter to send, Shift+Enter for a new line)",
  });
  const send = h("button", { type: "submit", class: "btn btn-primary", id: "send" }, "Send");
  const stop = h("button", { type: "button", class: "btn", id: "stop", disabled: true }, "Stop");
  const reset = h("button", { type: "button", class: "btn btn-ghost", id: "clear" }, "New chat");
  const grid = h("div", { class: "panes" });

  const layout = () => {
    const on = compare.checked;
    fill(grid, ...panes.slice(0, on ? 2 : 1).map((p) => p.el));
    grid.classList.toggle("panes-two", on);
    const q = new URLSearchParams({ model: panes[0].model });
    if (on) q.set("compare", panes[1].model);
    // replaceState does not fire hashchange: the view stays, only the shareable URL changes
    history.replaceState(null, "", `#/playground?${q}`);
  };
  compare.addEventListener("change", layout);
  for (const pane of panes) pane.select.addEventListener("change", layout);

  let inFlight = null;
  const form = h(
    "form",
    { class: "card composer" },
    h("label", { for: "prompt", class: "sr-only" }, "Prompt"),
    prompt,
    h("div", { class: "composer-actions" }, reset, h("span", { class: "spacer" }), stop, send),
  );
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => inFlight?.abort());
  reset.addEventListener("click", () => {
    inFlight?.abort();
    panes.forEach((p) => p.reset());
    prompt.focus();
  });
  signal.addEventListener("abort", () => inFlight?.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || inFlight) return;
    const settings = {
      system: system.value.trim(),
      temperature: Math.min(2, Math.max(0, Number(temperature.value) || 0)),
      maxTokens: Math.max(1, Math.round(Number(maxTokens.value) || 128)),
    };
    const active = panes.slice(0, compare.checked ? 2 : 1);
    inFlight = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    prompt.value = "";
    active.forEach((p) => p.addUser(text));
    // both sides at once: the server queues them for its one inference worker if it must
    await Promise.all(active.map((p) => p.answer(settings, inFlight.signal)));
    inFlight = null;
    send.disabled = false;
    stop.disabled = true;
    if (!signal.aborted) prompt.focus();
  });

  fill(
    root,
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        {},
        h("h1", {}, "Playground"),
        h(
          "p",
          { class: "muted" },
          "Chat with a base model, a fine-tuned model or a checkpoint; compare two side by side on the same prompts.",
        ),
      ),
    ),
    h(
      "div",
      { class: "card settings" },
      h("label", { class: "check", for: "compare" }, compare, " Compare two models"),
      h(
        "div",
        { class: "field field-wide" },
        h("label", { for: "system" }, "System prompt ", h("span", { class: "muted" }, "(optional)")),
        system,
      ),
      h("div", { class: "field" }, h("label", { for: "temperature" }, "Temperature"), temperature),
      h("div", { class: "field" }, h("label", { for: "max-tokens" }, "Max tokens"), maxTokens),
    ),
    grid,
    form,
  );
  layout();
  // not on touch screens, where focusing opens the keyboard over the page
  if (matchMedia("(pointer: fine)").matches) prompt.focus();
}
