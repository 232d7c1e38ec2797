// The shell: the login gate, the nav bar and hash routing (#/jobs, #/jobs/<id>, #/playground?model=...).
//
// Adding a page: write views/<name>.js exporting `title` and `render(root, ctx)`, add a line to ROUTES,
// and, if it belongs in the nav bar, to NAV. `ctx` gives the route's params and query, the project, and
// `ctx.signal`, aborted when the user leaves the page: pass it to api() and poll() and nothing outlives
// its view. Views load on first visit (dynamic import), so a new page costs nothing until it is opened.

import { api, clearKey, getKey } from "./api.js";
import { clear, errorBox, fill, h } from "./ui.js";

// prettier-ignore
const ROUTES = [
  { pattern: /^\/jobs\/?$/, load: () => import("./views/jobs.js"), nav: "jobs" },
  { pattern: /^\/jobs\/([^/]+)$/, load: () => import("./views/job.js"), nav: "jobs", params: ["id"] },
  { pattern: /^\/playground\/?$/, load: () => import("./views/playground.js"), nav: "playground" },
  // the feedback studio; `labeller: true` marks the pages a labeller's key may open (it can only label)
  { pattern: /^\/feedback\/?$/, load: () => import("./views/studio.js"), nav: "feedback", labeller: true },
  { pattern: /^\/feedback\/([^/]+)\/label$/, load: () => import("./views/label.js"), nav: "feedback", params: ["id"], labeller: true },
  { pattern: /^\/feedback\/([^/]+)$/, load: () => import("./views/queue.js"), nav: "feedback", params: ["id"] },
  { pattern: /^\/comparisons\/?$/, load: () => import("./views/comparisons.js"), nav: "comparisons" },
  { pattern: /^\/comparisons\/([^/]+)$/, load: () => import("./views/comparison.js"), nav: "comparisons", params: ["id"] },
];
const NAV = [
  { id: "jobs", href: "#/jobs", label: "Jobs" },
  { id: "playground", href: "#/playground", label: "Playground" },
  { id: "feedback", href: "#/feedback", label: "Feedback", labeller: true },
  { id: "comparisons", href: "#/comparisons", label: "Comparisons" },
];
const DEFAULT_ROUTE = "#/jobs";
const LABELLER_ROUTE = "#/feedback";

const main = document.getElementById("main");
const topbar = document.getElementById("topbar");
let session = null; // {project, key_id} once the key is checked
let leaving = null; // aborts the current view

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const cut = raw.indexOf("?");
  const path = decodeURIComponent(cut < 0 ? raw : raw.slice(0, cut));
  return { path, query: new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1)) };
}

function renderTopbar(active) {
  fill(
    topbar,
    h(
      "div",
      { class: "topbar-inner" },
      h(
        "a",
        { class: "brand", href: "#/jobs" },
        h("span", { class: "brand-mark", "aria-hidden": "true" }),
        "Tunery",
      ),
      h(
        "nav",
        { class: "nav", "aria-label": "Main" },
        NAV.filter((item) => item.labeller || !isLabeller()).map((item) =>
          h(
            "a",
            {
              href: item.href,
              class: item.id === active ? "active" : "",
              "aria-current": item.id === active ? "page" : null,
            },
            item.label,
          ),
        ),
      ),
      h(
        "div",
        { class: "whoami" },
        h(
          "span",
          { class: "project", title: `Project ${session.project} (key ${session.key_id})` },
          h("span", { class: "muted" }, "project "),
          session.project,
        ),
        h("button", { type: "button", class: "btn btn-ghost", onclick: logout }, "Log out"),
      ),
    ),
  );
  topbar.hidden = false;
}

async function route() {
  leaving?.abort();
  leaving = new AbortController();
  const { signal } = leaving;
  if (!session) return showLogin();
  const { path, query } = parseHash();
  const match = ROUTES.map((r) => [r, r.pattern.exec(path)]).find(([, m]) => m);
  if (!match) {
    location.replace(DEFAULT_ROUTE);
    return;
  }
  const [routeInfo, found] = match;
  if (isLabeller() && !routeInfo.labeller) {
    location.replace(LABELLER_ROUTE);
    return;
  }
  const params = Object.fromEntries((routeInfo.params || []).map((name, i) => [name, found[i + 1]]));
  renderTopbar(routeInfo.nav);
  clear(main);
  try {
    const view = await routeInfo.load();
    if (signal.aborted) return;
    document.title = `${typeof view.title === "function" ? view.title(params) : view.title} · Tunery`;
    await view.render(main, { params, query, signal, project: session.project });
  } catch (err) {
    if (err.name === "AbortError" || signal.aborted) return;
    console.error(err);
    fill(main, errorBox(err, "This page could not be shown"));
  }
}

async function showLogin(message = null) {
  topbar.hidden = true;
  clear(main);
  document.title = "Sign in · Tunery";
  const view = await import("./views/login.js");
  view.render(main, { message, onLogin: start });
}

/** Check the stored key (as the API does: GET /v1/models) and learn its project; then route. */
async function start() {
  if (!getKey()) return showLogin();
  try {
    session = await api("tunery/v1/me");
    if (!isLabeller()) await api("v1/models");
  } catch (err) {
    session = null;
    if (err.status === 401) clearKey();
    return showLogin(err.message);
  }
  if (!location.hash || location.hash === "#" || location.hash === "#/")
    location.replace(isLabeller() ? LABELLER_ROUTE : DEFAULT_ROUTE);
  else route();
}

/** A labeller's key (the feedback studio's labelling pages only; `role` from GET /tunery/v1/me). */
function isLabeller() {
  return session?.role === "labeller";
}

function logout() {
  clearKey();
  session = null;
  leaving?.abort();
  history.replaceState(null, "", location.pathname);
  showLogin();
}

window.addEventListener("hashchange", () => session && route());
window.addEventListener("tunery:unauthorized", (event) => {
  if (!session) return;
  clearKey();
  session = null;
  leaving?.abort();
  showLogin(`Signed out: ${event.detail.message}`);
});

start();
