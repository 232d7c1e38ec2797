// Small DOM helpers shared by the views. Text always goes in as text nodes (never as HTML), so a job
// name, an event message or a model's answer cannot inject markup; markdown.js is the one place that
// builds HTML, and it escapes first.

/** h("div", {class: "card", onclick: fn}, "text", child, [more children]) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

/** Replace el's children; like h(), it skips null, undefined and false (the DOM's append() would print them). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// --- formatting --------------------------------------------------------------------------------------------

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

export function fmtDate(unix) {
  return unix ? dateTime.format(new Date(unix * 1000)) : "–";
}

export function fmtClock(unix) {
  return unix ? timeOnly.format(new Date(unix * 1000)) : "–";
}

export function ago(unix) {
  if (!unix) return "–";
  const seconds = Math.round(Date.now() / 1000 - unix);
  if (seconds < 0) return "in " + duration(-seconds);
  if (seconds < 45) return "just now";
  return duration(seconds) + " ago";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h ${minutes % 60} min`;
  return `${Math.round(hours / 24)} days`;
}

/** A metric for people: 4 significant digits, scientific for tiny values (learning rates). */
export function fmtNum(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e6) return value.toLocaleString();
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

export function fmtPct(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
}

// --- pieces ------------------------------------------------------------------------------------------------

export const ACTIVE = ["validating_files", "queued", "running"];
export const TERMINAL = ["succeeded", "failed", "cancelled"];
const STATUS_LABELS = { validating_files: "validating" };

export function badge(status) {
  return h("span", { class: `badge badge-${status}`, dataset: { status } }, STATUS_LABELS[status] || status);
}

export function levelBadge(level) {
  return h("span", { class: `level level-${level}` }, level);
}

export function copyButton(text, label = "Copy") {
  const button = h(
    "button",
    { type: "button", class: "copy", title: `Copy ${text}`, "aria-label": `Copy ${text}` },
    label,
  );
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    event.stopPropagation();
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // no clipboard permission (plain http on another host): select-and-copy by hand still works
      return toast("Could not copy: select the text and copy it instead.", "error");
    }
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1200);
  });
  return button;
}

/** A monospace value with a copy button next to it. */
export function copyable(text) {
  return h("span", { class: "copyable" }, h("code", {}, text), copyButton(text));
}

export function errorBox(err, title = "Something went wrong") {
  return h(
    "div",
    { class: "alert alert-error", role: "alert" },
    h("strong", {}, title),
    h("p", {}, err instanceof Error ? err.message : String(err)),
  );
}

export function empty(title, ...body) {
  return h("div", { class: "empty" }, h("h3", {}, title), ...body);
}

/** A card named by its heading, for screen readers too: the section is labelled by the h2 `${id}-title`. */
export function cardSection(id, title, ...children) {
  return h(
    "section",
    { class: "card section", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, title),
    ...children,
  );
}

export function progressBar(step, total) {
  const fraction = total ? Math.min(1, Math.max(0, (step || 0) / total)) : 0;
  const fill = h("div", { class: "progress-fill" });
  // through the CSSOM: the page's content security policy refuses style attributes, not this
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  return h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": String(total || 0),
      "aria-valuenow": String(step || 0),
    },
    fill,
  );
}

let toastRoot = null;
export function toast(message, kind = "info") {
  toastRoot ??= document.body.appendChild(h("div", { class: "toasts", "aria-live": "polite" }));
  const item = toastRoot.appendChild(h("div", { class: `toast toast-${kind}` }, message));
  setTimeout(() => item.remove(), 4000);
}

/** A modal question; resolves true when confirmed. Native <dialog>: focus is trapped and Esc cancels. */
export function confirmDialog({ title, body, confirm = "Confirm", danger = false }) {
  return new Promise((resolve) => {
    const dialog = h(
      "dialog",
      { class: "dialog", "aria-labelledby": "dialog-title" },
      h("h2", { id: "dialog-title" }, title),
      h("p", {}, body),
      h(
        "form",
        { method: "dialog", class: "dialog-actions" },
        h("button", { value: "cancel", class: "btn", autofocus: true }, "Keep it"),
        h("button", { value: "ok", class: danger ? "btn btn-danger" : "btn btn-primary" }, confirm),
      ),
    );
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok");
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/**
 * Run `fn` now and then every `ms` until `signal` aborts, one call at a time (a slow answer delays the
 * next poll rather than stacking requests). A hidden tab is not polled; it catches up when shown.
 * `fn` returns false to stop; `now()` starts it again.
 */
export function poll(fn, ms, signal) {
  let timer = null;
  let running = false;
  let stopped = false;
  const tick = async () => {
    timer = null;
    if (signal.aborted || running || stopped) return;
    if (document.hidden) return;
    running = true;
    let again = true;
    try {
      again = (await fn()) !== false;
    } catch (err) {
      if (err.name !== "AbortError") console.error(err);
    } finally {
      running = false;
    }
    if (!again) stopped = true;
    else if (!signal.aborted) timer = setTimeout(tick, ms);
  };
  const onVisible = () => {
    if (!document.hidden && timer === null) tick();
  };
  document.addEventListener("visibilitychange", onVisible);
  signal.addEventListener("abort", () => {
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisible);
  });
  tick();
  // `now()` polls at once, and starts the polling again if `fn` had stopped it
  return {
    now: () => {
      stopped = false;
      clearTimeout(timer);
      tick();
    },
  };
}
