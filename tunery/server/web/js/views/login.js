// Sign in with an API key. The key is checked the way the API checks it (GET /tunery/v1/me with it as the
// Bearer token: any valid key, a labeller's too) before it is stored, so a wrong key shows the API's own
// message here.

import { api, setKey } from "../api.js";
import { h } from "../ui.js";

export const title = "Sign in";

export function render(root, { message, onLogin }) {
  const error = h("div", { class: "alert alert-error", role: "alert", hidden: !message }, message || "");
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "sk-tunery-…",
    required: true,
  });
  const remember = h("input", { id: "remember", type: "checkbox" });
  const submit = h("button", { type: "submit", class: "btn btn-primary btn-block" }, "Sign in");

  const form = h(
    "form",
    { class: "login-form", novalidate: true },
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "label",
      { class: "check", for: "remember" },
      remember,
      h(
        "span",
        {},
        "Remember on this device",
        h("span", { class: "muted" }, " (kept in this browser until you log out)"),
      ),
    ),
    error,
    submit,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      error.textContent = "Paste an API key first.";
      error.hidden = false;
      input.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Checking…";
    error.hidden = true;
    try {
      await api("tunery/v1/me", { key }); // any valid key: a labeller's key too
      setKey(key, remember.checked);
      input.value = "";
      await onLogin();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      input.select();
    } finally {
      submit.disabled = false;
      submit.textContent = "Sign in";
    }
  });

  root.append(
    h(
      "div",
      { class: "login" },
      h(
        "div",
        { class: "card login-card" },
        h(
          "div",
          { class: "login-brand" },
          h("span", { class: "brand-mark brand-mark-lg", "aria-hidden": "true" }),
          h("span", {}, "Tunery"),
        ),
        h("h1", {}, "Sign in"),
        h(
          "p",
          { class: "muted" },
          "Paste an API key of this server. A key belongs to one project: you see that project's jobs and models. Create one with ",
          h("code", {}, "tunery keys create --project NAME"),
          ".",
        ),
        form,
      ),
    ),
  );
  input.focus();
}
