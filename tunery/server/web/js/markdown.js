// A small markdown renderer for model cards: headings, paragraphs, lists (nested), tables, fenced code,
// block quotes, rules, and inline bold, italic, code and links. Not CommonMark: enough for what
// tunery/safety/card.py writes, and safe for anything else. Every piece of the input is HTML-escaped
// before any tag is added, and links keep only http(s), mailto and in-page targets, so the output can
// go to innerHTML even when the markdown is hostile.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const HOLE = "\u0000"; // marks where a code span goes back in; stripped from the input first

function inline(text) {
  // code spans come out first so nothing inside them is read as emphasis or a link
  const codes = [];
  let out = text.replace(/`([^`]+)`/g, (_, code) => {
    codes.push(code);
    return `${HOLE}${codes.length - 1}${HOLE}`;
  });
  out = escapeHtml(out);
  out = out.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (_, label, href) => link(label, href));
  out = out.replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>");
  out = out.replace(/__(?=\S)(.+?)__(?!\w)/g, "<strong>$1</strong>");
  out = out.replace(/(^|[^*\w])\*(?=\S)([^*]+?)\*(?!\w)/g, "$1<em>$2</em>");
  out = out.replace(/(^|[^\w])_(?=\S)([^_]+?)_(?!\w)/g, "$1<em>$2</em>");
  return out.replace(
    new RegExp(`${HOLE}(\\d+)${HOLE}`, "g"),
    (_, i) => `<code>${escapeHtml(codes[+i])}</code>`,
  );
}

function link(label, escapedHref) {
  // the href is already escaped (it came through escapeHtml with the rest of the line)
  const plain = escapedHref.replace(/&amp;/g, "&");
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(plain);
  if (scheme && !["http", "https", "mailto"].includes(scheme[1].toLowerCase())) return label;
  if (!scheme && !/^[#/.]/.test(plain)) return label;
  return `<a href="${escapedHref}" rel="noopener noreferrer" target="_blank">${label}</a>`;
}

// --- blocks -------------------------------------------------------------------------------------------------

const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const FENCE = /^\s*(```|~~~)/;

function indentOf(line) {
  return line.length - line.trimStart().length;
}

function cells(row) {
  // split on pipes, except escaped ones (\|) and those inside code spans
  const out = [""];
  let inCode = false;
  const text = row.trim();
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "\\" && text[i + 1] === "|") {
      out[out.length - 1] += "|";
      i++;
    } else if (c === "`") {
      inCode = !inCode;
      out[out.length - 1] += c;
    } else if (c === "|" && !inCode) out.push("");
    else out[out.length - 1] += c;
  }
  if (text.startsWith("|")) out.shift();
  if (text.endsWith("|") && out.length && out[out.length - 1].trim() === "") out.pop();
  return out.map((cell) => cell.trim());
}

function table(lines) {
  const align = cells(lines[1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "",
  );
  const row = (values, tag) =>
    "<tr>" +
    values
      .map((v, i) => `<${tag}${align[i] ? ` class="align-${align[i]}"` : ""}>${inline(v)}</${tag}>`)
      .join("") +
    "</tr>";
  const head = cells(lines[0]);
  const body = lines.slice(2).map((line) => row(cells(line), "td"));
  const hasHead = head.some((c) => c !== "");
  return (
    '<div class="table-wrap"><table>' +
    (hasHead ? `<thead>${row(head, "th")}</thead>` : "") +
    `<tbody>${body.join("")}</tbody></table></div>`
  );
}

function list(lines) {
  const base = indentOf(lines[0]);
  const ordered = /^\d/.test(LIST_ITEM.exec(lines[0])[2]);
  const items = [];
  for (const line of lines) {
    const match = LIST_ITEM.exec(line);
    if (match && indentOf(line) <= base + 1) items.push([match[3]]);
    else items[items.length - 1].push(line.slice(Math.min(indentOf(line), base + 2)));
  }
  const html = items.map((item) => {
    const rest = item.slice(1);
    const nested = rest.length ? blocks(rest) : "";
    return `<li>${inline(item[0])}${nested}</li>`;
  });
  const tag = ordered ? "ol" : "ul";
  return `<${tag}>${html.join("")}</${tag}>`;
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    if (FENCE.test(line)) {
      const fence = FENCE.exec(line)[1];
      const code = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence)) code.push(lines[i++]);
      i++;
      out.push(`<pre><code>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    const heading = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) {
      // one level down: the page has its own h1, and a card's title sits below it
      const level = Math.min(6, heading[1].length + 1);
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      i++;
      continue;
    }
    if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
      out.push("<hr>");
      i++;
      continue;
    }
    if (
      line.includes("|") &&
      i + 1 < lines.length &&
      TABLE_RULE.test(lines[i + 1]) &&
      lines[i + 1].includes("-")
    ) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(lines[i++]);
      out.push(table(rows));
      continue;
    }
    if (/^\s{0,3}>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s{0,3}>/.test(lines[i]))
        quoted.push(lines[i++].replace(/^\s{0,3}>\s?/, ""));
      out.push(`<blockquote>${blocks(quoted)}</blockquote>`);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const base = indentOf(line);
      const kind = (l) => /^\d/.test(LIST_ITEM.exec(l)[2]); // ordered or not: a change starts a new list
      const items = [line];
      i++;
      while (i < lines.length) {
        const next = lines[i];
        if (!next.trim()) {
          // a blank line ends the list unless the list (or an item's body) carries on after it
          const after = lines[i + 1];
          if (after !== undefined && (LIST_ITEM.test(after) || indentOf(after) > base) && after.trim()) {
            i++;
            continue;
          }
          break;
        }
        if (indentOf(next) > base + 1) items.push(lines[i++]);
        else if (LIST_ITEM.test(next) && kind(next) === kind(line)) items.push(lines[i++]);
        else break;
      }
      out.push(list(items));
      continue;
    }
    const paragraph = [];
    while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) paragraph.push(lines[i++].trim());
    if (!paragraph.length) paragraph.push(lines[i++].trim()); // a line no rule took: keep it as text
    out.push(`<p>${inline(paragraph.join(" "))}</p>`);
  }
  return out.join("\n");
}

function startsBlock(lines, i) {
  const line = lines[i];
  return (
    FENCE.test(line) ||
    /^\s{0,3}#{1,6}\s/.test(line) ||
    /^\s{0,3}>/.test(line) ||
    LIST_ITEM.test(line) ||
    (line.includes("|") &&
      i + 1 < lines.length &&
      TABLE_RULE.test(lines[i + 1]) &&
      lines[i + 1].includes("-"))
  );
}

/** Markdown text -> HTML whose every text run is escaped. */
export function renderMarkdown(text) {
  const clean = String(text).replaceAll(HOLE, "").replace(/\r\n?/g, "\n");
  return blocks(clean.split("\n"));
}
