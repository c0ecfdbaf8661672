// A small, safe Markdown renderer for chat replies (no dependencies).
//
// Safety: every piece of source text is HTML-escaped before it reaches the output; the only tags
// emitted are the ones written below, and link targets must be http(s), mailto, or relative.
// Supported: ATX headings, paragraphs, **bold**, *italic* / _italic_, ~~strike~~, `code`,
// fenced code blocks (an unclosed fence renders as code, so a streaming reply looks right),
// ordered/unordered (nested) lists, blockquotes, horizontal rules, GFM tables, [links](url),
// bare URLs, hard line breaks inside paragraphs.

const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Escape text for use in HTML content or a quoted attribute. */
export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ESC[c]);
}

const SAFE_URL = /^(https?:\/\/|mailto:|\/(?!\/)|#|\.{0,2}\/)/i;

/** Render inline Markdown (one paragraph's text) to HTML. */
export function renderInline(src) {
  const slots = [];
  const keep = (html) => `\u0000${slots.push(html) - 1}\u0000`;
  let s = String(src).replace(/\u0000/g, "");
  // code spans first: their content is literal
  s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, _t, code) =>
    keep(`<code>${escapeHtml(code.replace(/^ (.*) $/, "$1"))}</code>`));
  // links [text](url "title") — text is rendered inline, url checked against the allow list
  s = s.replace(/\[([^\]\n]+)\]\(\s*<?([^\s)<>]+)>?(?:\s+"[^"]*")?\s*\)/g, (m, text, url) => {
    if (!SAFE_URL.test(url)) return keep(escapeHtml(m));
    return keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">` +
      `${renderEmphasis(escapeHtml(text))}</a>`);
  });
  // bare URLs
  s = s.replace(/\bhttps?:\/\/[^\s<>"'`\u0000]+[^\s<>"'`.,;:!?)\]\u0000。，；：！？）]/g, (url) =>
    keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${escapeHtml(url)}</a>`));
  s = renderEmphasis(escapeHtml(s));
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => slots[Number(i)]);
}

function renderEmphasis(s) {
  return s
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=[^\s_])([^_]*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>")
    .replace(/ {2,}\n|\\\n/g, "<br>");
}

// ---------------------------------------------------------------- code highlighting

const KEYWORDS = new Set((
  "and as assert async await break case catch class const continue def default del do elif else " +
  "enum except export extends false False finally fn for from func function go if impl import in " +
  "interface is lambda let match mod module mut new nil None nonlocal not null or package pass " +
  "print private protected pub public raise return self Self static struct super switch this " +
  "throw true True try type typeof use var void where while with yield " +
  "SELECT FROM WHERE GROUP BY ORDER INSERT INTO VALUES UPDATE SET DELETE JOIN LEFT RIGHT INNER " +
  "OUTER ON AS AND OR NOT NULL LIMIT HAVING CREATE TABLE DISTINCT COUNT SUM AVG MIN MAX"
).split(" "));
const HASH_COMMENT = /^(py|python|sh|bash|shell|zsh|console|yaml|yml|toml|r|ruby|rb|perl|makefile|dockerfile|ini|conf)$/i;

/** Highlight code with a light, language-agnostic tokenizer; returns escaped HTML. */
export function highlight(code, lang = "") {
  const hash = HASH_COMMENT.test(lang) || lang === "";
  const parts = [
    String.raw`\/\*[\s\S]*?(?:\*\/|$)`,                         // block comment
    String.raw`\/\/[^\n]*`,                                     // line comment
    hash ? String.raw`#[^\n]*` : null,                          // hash comment
    /^sql$/i.test(lang) ? String.raw`--[^\n]*` : null,          // sql comment
    String.raw`"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)`,     // triple strings
    String.raw`"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?|\`(?:\\.|[^\`\\])*\`?`,  // strings
    String.raw`\b(?:0x[\da-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\b`,           // numbers
    String.raw`[A-Za-z_$][\w$]*`,                               // words
  ].filter(Boolean);
  const re = new RegExp(parts.join("|"), "g");
  let out = "";
  let last = 0;
  for (const m of code.matchAll(re)) {
    const tok = m[0];
    out += escapeHtml(code.slice(last, m.index));
    last = m.index + tok.length;
    const c = tok[0];
    let cls = null;
    if (tok.startsWith("/*") || tok.startsWith("//") || (hash && c === "#") || tok.startsWith("--")) cls = "c";
    else if (c === '"' || c === "'" || c === "`") cls = "s";
    else if (/\d/.test(c)) cls = "n";
    else if (KEYWORDS.has(tok)) cls = "k";
    else if (code[last] === "(") cls = "f";
    out += cls ? `<span class="tok-${cls}">${escapeHtml(tok)}</span>` : escapeHtml(tok);
  }
  return out + escapeHtml(code.slice(last));
}

// ---------------------------------------------------------------- blocks

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^\n]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const HR = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function codeBlock(code, lang) {
  const label = lang ? `<span class="code-lang">${escapeHtml(lang)}</span>` : "<span></span>";
  return `<div class="code-block"><div class="code-head">${label}` +
    `<button type="button" class="copy-code" data-testid="copy-code"></button></div>` +
    `<pre><code class="lang-${escapeHtml(lang || "text")}">${highlight(code, lang)}</code></pre></div>`;
}

/** Render a Markdown document to HTML. */
export function renderMarkdown(src) {
  const lines = String(src ?? "").replace(/\r\n?/g, "\n").split("\n");
  return renderBlocks(lines);
}

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) out.push(`<p>${renderInline(para.join("\n"))}</p>`);
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      flush();
      const fence = m[1];
      const lang = m[2] || "";
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) &&
             /^ {0,3}(`{3,}|~{3,})\s*$/.test(lines[i]))) body.push(lines[i++]);
      i++; // closing fence (or past the end while streaming)
      out.push(codeBlock(body.join("\n"), lang));
      continue;
    }
    if (!line.trim()) { flush(); i++; continue; }
    if ((m = line.match(HEADING))) {
      flush();
      const n = m[1].length;
      out.push(`<h${n}>${renderInline(m[2])}</h${n}>`);
      i++;
      continue;
    }
    if (HR.test(line) && !(para.length && /^\s*-+\s*$/.test(line))) {
      flush();
      out.push("<hr>");
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const body = [];
      while (i < lines.length && lines[i].trim() && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
      out.push(`<blockquote>${renderBlocks(body)}</blockquote>`);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) &&
        lines[i + 1].includes("-")) {
      flush();
      const head = splitRow(line);
      const aligns = splitRow(lines[i + 1]).map((c) =>
        c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
      i += 2;
      const rows = [];
      while (i < lines.length && lines[i].trim() && lines[i].includes("|")) rows.push(splitRow(lines[i++]));
      const cell = (tag, c, k) =>
        `<${tag}${aligns[k] ? ` style="text-align:${aligns[k]}"` : ""}>${renderInline(c)}</${tag}>`;
      out.push(`<div class="table-wrap"><table><thead><tr>${head.map((c, k) => cell("th", c, k)).join("")}` +
        `</tr></thead><tbody>${rows.map((r) => `<tr>${head.map((_, k) => cell("td", r[k] ?? "", k)).join("")}</tr>`).join("")}` +
        "</tbody></table></div>");
      continue;
    }
    if ((m = line.match(LIST_ITEM)) && (!para.length || !m[1])) {
      flush();
      const [html, next] = renderList(lines, i);
      out.push(html);
      i = next;
      continue;
    }
    para.push(line);
    i++;
  }
  flush();
  return out.join("\n");
}

function renderList(lines, start) {
  const first = lines[start].match(LIST_ITEM);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const startNum = ordered ? parseInt(first[2], 10) : 1;
  const items = [];
  let i = start;
  let cur = null;
  while (i < lines.length) {
    const line = lines[i];
    const m = line.match(LIST_ITEM);
    if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
      cur = [m[3]];
      items.push(cur);
      i++;
      continue;
    }
    if (!line.trim()) {
      // a blank line continues the list only if an indented line or a sibling item follows
      const nxt = lines[i + 1];
      if (nxt !== undefined && (/^\s+\S/.test(nxt) && nxt.match(/^\s*/)[0].length > indent ||
          (nxt.match(LIST_ITEM) && nxt.match(LIST_ITEM)[1].length === indent))) { cur.push(""); i++; continue; }
      break;
    }
    const lead = line.match(/^\s*/)[0].length;
    if (lead > indent || (!m && !FENCE.test(line) && !HEADING.test(line) && cur[cur.length - 1] !== "")) {
      cur.push(line.slice(Math.min(lead, indent + 2 + (ordered ? 1 : 0))));
      i++;
      continue;
    }
    break;
  }
  const tag = ordered ? "ol" : "ul";
  const startAttr = ordered && startNum !== 1 ? ` start="${startNum}"` : "";
  const body = items.map((it) => {
    const loose = it.slice(0, -1).includes("");
    const inner = renderBlocks(it);
    const tight = !loose && /^<p>[\s\S]*?<\/p>/.test(inner)
      ? inner.replace(/^<p>([\s\S]*?)<\/p>/, "$1") : inner;
    return `<li>${tight}</li>`;
  }).join("");
  return [`<${tag}${startAttr}>${body}</${tag}>`, i];
}
