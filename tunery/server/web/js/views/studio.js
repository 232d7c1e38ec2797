// The feedback studio's front page. For an admin: the labelling queues (status, answers written, labels
// given), a form to make a queue from a prompts file and one or two models, and the project's labellers
// (add one: its key is shown once; revoke). For a labeller: the queues there are to label.

import { api } from "../api.js";
import { chatModels, field, fineTuneFiles, select, upload } from "../feedback.js";
import { ago, badge, cardSection, confirmDialog, copyable, empty, errorBox, fill, fmtDate, h, poll, progressBar, toast } from "../ui.js";

export const title = "Feedback studio";

export async function render(root, { signal }) {
  const me = await api("tunery/v1/me", { signal });
  if (me.role === "labeller") return renderLabeller(root, me, signal);

  const queuesBody = h("div", {}, h("p", { class: "muted" }, "Loading queues…"));
  const formCard = h("section", { class: "card section studio-form", hidden: true, id: "new-queue" });
  const labellersBody = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const newButton = h("button", { type: "button", class: "btn btn-primary", id: "new-queue-button" }, "New queue");
  newButton.addEventListener("click", () => {
    formCard.hidden = !formCard.hidden;
    if (!formCard.hidden && !formCard.childElementCount) buildForm(formCard, signal).catch((err) => fill(formCard, errorBox(err)));
    if (!formCard.hidden) formCard.scrollIntoView({ block: "nearest" });
  });

  root.append(
    h(
      "div",
      { class: "page-head" },
      h("div", {}, h("h1", {}, "Feedback studio"), h("p", { class: "muted" }, "Collect human comparisons of answers, check their quality, and train on them.")),
      h("div", { class: "actions" }, h("a", { class: "btn", href: "#/comparisons" }, "Comparisons"), newButton),
    ),
    formCard,
    h(
      "div",
      { class: "studio-grid" },
      h("div", {}, queuesBody),
      cardSection("labellers", "Labellers", labellersBody),
    ),
  );

  const refresh = async () => {
    const page = await api("tunery/v1/feedback/queues?kind=labelling", { signal });
    fill(queuesBody, page.data.length ? queueTable(page.data) : noQueues());
    return page.data.some((q) => q.status === "generating");
  };
  poll(async () => {
    try {
      return await refresh();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      fill(queuesBody, errorBox(err, "Could not load the queues"));
      return false;
    }
  }, 2000, signal);
  renderLabellers(labellersBody, signal);
}

function noQueues() {
  return empty(
    "No labelling queues yet",
    h("p", { class: "muted" }, "Make one from a prompts file (JSONL with messages or prompt per line) and one or two models: the answers are written in the background, then people label them."),
  );
}

function queueTable(queues) {
  return h(
    "div",
    { class: "card table-card" },
    h(
      "table",
      { class: "table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Queue"), h("th", {}, "Status"), h("th", {}, "Models"), h("th", { class: "col-progress" }, "Labels"), h("th", {}, "Created"))),
      h(
        "tbody",
        {},
        queues.map((q) => {
          const href = `#/feedback/${encodeURIComponent(q.id)}`;
          const tr = h(
            "tr",
            { class: "clickable", dataset: { queue: q.id } },
            h("td", {}, h("a", { href, class: "job-link" }, q.name), h("div", { class: "small muted" }, `${q.mode} · ${q.items.ready} of ${q.items.total} items ready`)),
            h("td", {}, badge(q.status)),
            h(
              "td",
              { class: "model-cell" },
              h("div", { class: "mono small" }, q.model_a || "imported answers"),
              q.model_b ? h("div", { class: "mono small" }, "vs ", q.model_b) : q.model_a && q.mode === "pairwise" ? h("div", { class: "small muted" }, "two samples") : null,
            ),
            h("td", {}, h("div", { class: "progress-cell" }, progressBar(q.labels, q.labels_needed), h("span", { class: "small muted tabular" }, `${q.labels} / ${q.labels_needed}`))),
            h("td", { title: fmtDate(q.created_at) }, ago(q.created_at)),
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

async function buildForm(card, signal) {
  const [models, files] = await Promise.all([chatModels(signal), fineTuneFiles(signal)]);
  const name = h("input", { id: "queue-name", type: "text", required: true, placeholder: "e.g. Support tone, June" });
  const mode = select("queue-mode", [["pairwise", "Pairwise: which of two answers is better"], ["thumbs", "Thumbs: rate one answer up or down"]]);
  const fileSelect = select("queue-file", files.map((f) => [f.id, `${f.filename} (${f.id})`]), { blank: files.length ? "Choose an uploaded file…" : "No files yet: upload one" });
  const fileInput = h("input", { id: "queue-upload", type: "file", accept: ".jsonl" });
  const modelA = select("queue-model-a", models.map((m) => [m, m]), { value: models[0] });
  const modelB = select("queue-model-b", models.map((m) => [m, m]), { blank: "— two samples of model A —" });
  const perItem = h("input", { id: "queue-per-item", type: "number", min: 1, max: 10, value: 2 });
  const maxTokens = h("input", { id: "queue-max-tokens", type: "number", min: 1, max: 4096, value: 256 });
  const temperature = h("input", { id: "queue-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 1 });
  const instructions = h("textarea", { id: "queue-instructions", rows: 2, placeholder: "What should labellers judge? e.g. Which answer is more helpful and polite?" });
  const errorSlot = h("div");
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "create-queue" }, "Create queue");
  mode.addEventListener("change", () => (modelB.disabled = mode.value === "thumbs"));

  const form = h(
    "form",
    { novalidate: true },
    h("h2", {}, "New labelling queue"),
    h(
      "div",
      { class: "form-grid" },
      field("Name", name),
      field("Mode", mode),
      field("Prompts file", fileSelect, "(JSONL: messages or prompt per line)"),
      field("…or upload one", fileInput),
      field("Model A", modelA),
      field("Model B", modelB, "(pairwise)"),
      field("Labels per item", perItem, "(2+ measures agreement)"),
      field("Max tokens", maxTokens),
      field("Temperature", temperature),
      field("Instructions for labellers", instructions, null, true),
    ),
    errorSlot,
    h("div", { class: "form-actions" }, h("button", { type: "button", class: "btn", onclick: () => (card.hidden = true) }, "Cancel"), submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    fill(errorSlot);
    submit.disabled = true;
    try {
      let fileId = fileSelect.value;
      if (fileInput.files.length) fileId = (await upload(fileInput.files[0])).id;
      if (!fileId) throw new Error("Choose a prompts file or upload one.");
      const body = {
        name: name.value.trim() || "Untitled queue",
        mode: mode.value,
        prompts_file: fileId,
        model_a: modelA.value,
        labels_per_item: Number(perItem.value) || 1,
        max_tokens: Number(maxTokens.value) || 256,
        temperature: Number(temperature.value),
        instructions: instructions.value.trim(),
      };
      if (mode.value === "pairwise" && modelB.value) body.model_b = modelB.value;
      const queue = await api("tunery/v1/feedback/queues", { method: "POST", body, signal });
      toast(`Queue "${queue.name}" created: answers are being written.`);
      location.hash = `#/feedback/${encodeURIComponent(queue.id)}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      fill(errorSlot, errorBox(err, "The queue was not created"));
    } finally {
      submit.disabled = false;
    }
  });
  fill(card, form);
  name.focus();
}

async function renderLabellers(body, signal) {
  const name = h("input", { id: "labeller-name", type: "text", placeholder: "Name, e.g. Ana" });
  const add = h("button", { type: "submit", class: "btn", id: "add-labeller" }, "Add");
  const list = h("ul", { class: "labeller-list" });
  const shown = h("div");
  const form = h("form", { class: "inline-form" }, h("label", { class: "field", for: "labeller-name" }, h("span", {}, "New labeller"), name), add);
  const load = async () => {
    const page = await api("tunery/v1/labellers", { signal });
    fill(
      list,
      page.data.length
        ? page.data.map((l) =>
            h(
              "li",
              {},
              h("div", { class: "who" }, h("div", { class: l.revoked_at ? "revoked" : "" }, l.name), h("div", { class: "small muted" }, `${l.labels} labels · ${l.prefix}…`)),
              l.revoked_at
                ? h("span", { class: "small muted" }, "revoked")
                : h("button", { type: "button", class: "btn btn-small btn-danger-outline", onclick: () => revoke(l) }, "Revoke"),
            ),
          )
        : h("li", { class: "muted" }, "No labellers yet. Each gets a key of their own: it can label, nothing else."),
    );
  };
  const revoke = async (labeller) => {
    const sure = await confirmDialog({ title: `Revoke ${labeller.name}'s key?`, body: "Their labels stay; the key stops working at once.", confirm: "Revoke", danger: true });
    if (!sure) return;
    await api(`tunery/v1/labellers/${encodeURIComponent(labeller.id)}`, { method: "DELETE", signal });
    load();
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!name.value.trim()) return name.focus();
    add.disabled = true;
    try {
      const made = await api("tunery/v1/labellers", { method: "POST", body: { name: name.value.trim() }, signal });
      fill(
        shown,
        h(
          "div",
          { class: "key-once", role: "status" },
          h("div", { class: "small" }, h("strong", {}, made.name), "'s key: shown once, give it to them. They sign in with it and see only what there is to label."),
          copyable(made.key),
        ),
      );
      name.value = "";
      load();
    } catch (err) {
      fill(shown, errorBox(err, "No key was made"));
    } finally {
      add.disabled = false;
    }
  });
  fill(body, form, shown, list);
  await load().catch((err) => fill(list, errorBox(err)));
}

async function renderLabeller(root, me, signal) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, `Hello, ${me.name}`), h("p", { class: "muted" }, "Pick a queue. Every label is saved the moment you give it: you can stop at any time."))),
    body,
  );
  poll(async () => {
    const page = await api("tunery/v1/feedback/queues", { signal });
    const mine = await Promise.all(page.data.map((q) => api(`tunery/v1/feedback/queues/${encodeURIComponent(q.id)}/progress`, { signal })));
    if (!page.data.length) {
      fill(body, empty("Nothing to label yet", h("p", { class: "muted" }, "Queues appear here when your project's admin makes them.")));
      return true;
    }
    fill(
      body,
      h(
        "div",
        { class: "queue-cards" },
        page.data.map((q, i) => {
          const p = mine[i];
          const total = p.labelled_by_me + p.left_for_me;
          return h(
            "article",
            { class: "card queue-card", dataset: { queue: q.id } },
            h("h2", {}, q.name),
            q.instructions ? h("p", { class: "instructions" }, q.instructions) : null,
            h("div", { class: "progress-cell" }, progressBar(p.labelled_by_me, total), h("span", { class: "small muted tabular nowrap" }, `${p.labelled_by_me} / ${total} done`)),
            h(
              "a",
              { class: p.left_for_me ? "btn btn-primary" : "btn", href: `#/feedback/${encodeURIComponent(q.id)}/label` },
              p.left_for_me ? (p.labelled_by_me ? "Continue labelling" : "Start labelling") : "Review",
            ),
          );
        }),
      ),
    );
    return true;
  }, 5000, signal);
}
