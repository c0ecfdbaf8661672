// Knowledge-base panel of the web chat: create a knowledge base, pick the one chats are grounded
// on, upload documents (with progress), list and remove them, and show an answer's citations.
// The chat itself stays in app.js; it calls initKnowledge() once and asks selectedKnowledgeBase()
// for the `knowledge_base` field of each request, and decorateMessage() to show citations.

const ACCEPT = ".txt,.md,.markdown,.html,.htm,.pdf,.docx,.csv,.json";

let ctx = null; // { t, headers, apiUrl, errorMessage, settings, saveSettings }
let kbs = [];
let busy = false;
let loaded = false; // listed once the panel is used: listing opens the server's vector database
let listing = 0; // the latest listing request; an older answer arriving late is ignored

const $ = (id) => document.getElementById(id);
const el = {};

/** Wire the panel; `context` gives the chat's helpers (strings, API headers, error text, settings). */
export function initKnowledge(context) {
  ctx = context;
  Object.assign(el, {
    select: $("kb-select"), createForm: $("kb-create"), name: $("kb-name"),
    language: $("kb-language"), box: $("kb-docs-box"), files: $("kb-files"),
    progress: $("kb-progress"), bar: $("kb-progress-bar"), progressText: $("kb-progress-text"),
    documents: $("kb-documents"), status: $("kb-status"), badge: $("kb-badge"),
  });
  el.files.accept = ACCEPT;
  el.select.addEventListener("change", () => selectKnowledgeBase(el.select.value));
  el.createForm.addEventListener("submit", (e) => {
    e.preventDefault();
    createKnowledgeBase();
  });
  el.files.addEventListener("change", () => {
    const files = [...el.files.files];
    el.files.value = "";
    if (files.length) uploadFiles(files);
  });
  // The first listing starts the server's vector database (Milvus Lite): do it when the panel is
  // used, or at once when the chat is grounded on a knowledge base chosen earlier.
  const panel = $("kb-panel");
  const firstUse = () => {
    if (!loaded) refreshKnowledgeBases();
  };
  panel.addEventListener("pointerenter", firstUse);
  panel.addEventListener("focusin", firstUse);
  if (selectedKnowledgeBase()) firstUse();
}

/** The knowledge base chats are grounded on ("" for none). */
export function selectedKnowledgeBase() {
  return ctx?.settings.knowledgeBase || "";
}

/** Re-draw the panel's texts after a language change. */
export function renderKnowledge() {
  if (!ctx) return;
  renderSelect();
  renderDocuments(currentDocs);
}

// ---------------------------------------------------------------- API

async function api(path, options = {}) {
  const resp = await fetch(ctx.apiUrl(path), { headers: ctx.headers(), ...options });
  if (!resp.ok) throw new Error(await ctx.errorMessage(resp));
  return resp.json();
}

const kbPath = (name, rest = "") => `v1/knowledge_bases/${encodeURIComponent(name)}${rest}`;

function showStatus(text, kind = "info") {
  el.status.textContent = text;
  el.status.dataset.kind = kind;
  el.status.hidden = !text;
}

function failed(err) {
  const text = err instanceof TypeError ? `${ctx.t("networkError")}: ${err.message}` : err.message;
  showStatus(text, "error");
}

/** Reload the list of knowledge bases (and the selected one's documents). */
export async function refreshKnowledgeBases({ ifLoaded = false } = {}) {
  if (!ctx || (ifLoaded && !loaded)) return;
  loaded = true;
  const mine = ++listing;
  try {
    const found = (await api("v1/knowledge_bases")).data || [];
    if (mine !== listing) return;
    kbs = found;
    if (!kbs.some((k) => k.id === ctx.settings.knowledgeBase)) setSelected("");
    if (el.status.dataset.kind === "error") showStatus("");
  } catch (err) {
    if (mine !== listing) return;
    kbs = []; // the selection is kept: the key may be missing for now
    failed(err);
  }
  renderSelect();
  await loadDocuments();
}

function setSelected(name) {
  ctx.settings.knowledgeBase = name;
  ctx.saveSettings();
}

function selectKnowledgeBase(name) {
  setSelected(name);
  showStatus("");
  renderSelect();
  loadDocuments();
}

async function createKnowledgeBase() {
  const name = el.name.value.trim();
  if (!name || busy) return;
  setBusy(true);
  showStatus(ctx.t("kbCreating"));
  try {
    await api("v1/knowledge_bases", {
      method: "POST", body: JSON.stringify({ name, language: el.language.value }),
    });
    el.name.value = "";
    setSelected(name);
    showStatus(ctx.t("kbCreated", name), "ok");
    await refreshKnowledgeBases();
  } catch (err) {
    failed(err);
  } finally {
    setBusy(false);
  }
}

let currentDocs = [];

async function loadDocuments() {
  const name = selectedKnowledgeBase();
  el.box.hidden = !name;
  if (!name) {
    renderDocuments([]);
    return;
  }
  try {
    const kb = await api(kbPath(name));
    if (name === selectedKnowledgeBase()) renderDocuments(kb.documents || []);
  } catch (err) {
    failed(err);
  }
}

async function removeDocument(source) {
  const name = selectedKnowledgeBase();
  if (!name || !window.confirm(ctx.t("kbRemoveConfirm", source))) return;
  try {
    await api(kbPath(name, `/documents/${source.split("/").map(encodeURIComponent).join("/")}`),
      { method: "DELETE" });
    showStatus(ctx.t("kbRemoved", source), "ok");
  } catch (err) {
    failed(err);
  }
  await refreshKnowledgeBases();
}

/** Upload with XMLHttpRequest: fetch() cannot report upload progress. */
function uploadFiles(files) {
  const name = selectedKnowledgeBase();
  if (!name || busy) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", ctx.apiUrl(kbPath(name, "/documents")));
  const h = ctx.headers();
  delete h["Content-Type"]; // the browser sets multipart/form-data with its boundary
  for (const [k, v] of Object.entries(h)) xhr.setRequestHeader(k, v);
  xhr.responseType = "text";
  setBusy(true);
  showStatus("");
  setProgress(0, ctx.t("kbUploading", files.length, 0));
  xhr.upload.addEventListener("progress", (e) => {
    if (!e.lengthComputable) return;
    const pct = Math.round((100 * e.loaded) / e.total);
    setProgress(pct, ctx.t("kbUploading", files.length, pct));
  });
  xhr.upload.addEventListener("load", () => setProgress(100, ctx.t("kbIndexing")));
  const finish = async (handler) => {
    try {
      await handler();
    } catch (err) {
      failed(err);
    } finally {
      setBusy(false);
      el.progress.hidden = true;
      await refreshKnowledgeBases();
    }
  };
  xhr.addEventListener("load", () => finish(async () => {
    if (xhr.status < 200 || xhr.status >= 300) {
      throw new Error(await ctx.errorMessage(new Response(xhr.responseText, { status: xhr.status })));
    }
    const body = JSON.parse(xhr.responseText);
    const done = (body.data || []).map((d) => `${d.source}: ${ctx.t(`kbStatus_${d.status}`)} ` +
      `(${ctx.t("kbChunks", d.chunks)})`);
    const errors = (body.errors || []).map((e) => `${e.source}: ${e.error}`);
    showStatus([...done, ...errors].join("\n"), errors.length ? "error" : "ok");
  }));
  xhr.addEventListener("error", () => finish(() => {
    throw new Error(ctx.t("networkError"));
  }));
  xhr.send(form);
}

function setProgress(pct, text) {
  el.progress.hidden = false;
  el.bar.value = pct;
  el.progressText.textContent = text;
}

function setBusy(on) {
  busy = on;
  for (const node of el.createForm.querySelectorAll("input, select, button")) node.disabled = on;
  el.files.disabled = on;
  el.files.closest("label").classList.toggle("disabled", on);
}

// ---------------------------------------------------------------- panel

function renderSelect() {
  const none = new Option(ctx.t("kbNone"), "");
  const opts = kbs.map((k) => new Option(`${k.id} (${ctx.t("kbDocCount", k.documents)})`, k.id));
  const sel = selectedKnowledgeBase();
  if (sel && !kbs.some((k) => k.id === sel)) opts.push(new Option(sel, sel)); // not listed (yet)
  el.select.replaceChildren(none, ...opts);
  el.select.value = sel;
  el.badge.textContent = sel;
  el.badge.hidden = !sel;
}

function renderDocuments(docs) {
  currentDocs = docs;
  el.documents.replaceChildren();
  if (!docs.length && selectedKnowledgeBase()) {
    const li = document.createElement("li");
    li.className = "kb-empty";
    li.textContent = ctx.t("kbNoDocuments");
    el.documents.append(li);
  }
  for (const d of docs) {
    const li = document.createElement("li");
    li.className = "kb-doc";
    li.dataset.testid = "kb-document";
    const label = document.createElement("span");
    label.className = "kb-doc-name";
    label.textContent = d.source;
    label.title = d.source;
    const meta = document.createElement("span");
    meta.className = "kb-doc-meta";
    meta.textContent = ctx.t("kbChunks", d.chunks);
    const del = document.createElement("button");
    del.type = "button";
    del.className = "icon-btn kb-doc-remove";
    del.dataset.testid = "kb-document-remove";
    del.title = ctx.t("kbRemove");
    del.setAttribute("aria-label", `${del.title}: ${d.source}`);
    del.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18"/></svg>';
    del.addEventListener("click", () => removeDocument(d.source));
    li.append(label, meta, del);
    el.documents.append(li);
  }
}

// ---------------------------------------------------------------- citations in messages

/**
 * Show an assistant message's citations: [n] markers in its text become buttons, a list of the
 * cited sources goes under it, and either opens the cited passage (source, page, text).
 */
export function decorateMessage(node, msg, streaming) {
  const cites = msg.citations || [];
  if (!cites.length) return;
  const content = node.querySelector(".markdown");
  const meta = node.querySelector(".msg-meta");
  const box = document.createElement("div");
  box.className = "citations";
  box.dataset.testid = "citations";
  const label = document.createElement("span");
  label.className = "citations-label";
  label.textContent = ctx.t("kbSources");
  const list = document.createElement("div");
  list.className = "citation-list";
  const view = document.createElement("div");
  view.className = "citation-view";
  view.dataset.testid = "citation-passage";
  view.hidden = true;
  const open = (n) => showPassage(view, list, cites.find((c) => c.index === n));
  for (const c of cites) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "citation";
    b.dataset.testid = "citation";
    b.dataset.n = c.index;
    b.textContent = `[${c.index}] ${c.source}${c.page ? ` · ${ctx.t("kbPage", c.page)}` : ""}`;
    b.title = c.text;
    b.addEventListener("click", () => open(c.index));
    list.append(b);
  }
  box.append(label, list, view);
  meta.prepend(box);
  if (!streaming) linkCitations(content, cites, open);
}

function showPassage(view, list, c) {
  if (!c) return;
  const same = !view.hidden && view.dataset.n === String(c.index);
  for (const b of list.children) b.classList.toggle("active", !same && b.dataset.n === String(c.index));
  view.hidden = same;
  if (same) return;
  view.dataset.n = c.index;
  const head = document.createElement("div");
  head.className = "citation-head";
  const where = [c.source, c.page ? ctx.t("kbPage", c.page) : "", (c.headings || []).join(" › ")];
  head.textContent = `[${c.index}] ${where.filter(Boolean).join(" · ")}`;
  const text = document.createElement("blockquote");
  text.className = "citation-text";
  text.dataset.testid = "citation-text";
  text.textContent = c.text;
  view.replaceChildren(head, text);
}

/** Turn "[1]" and "[1, 2]" in the rendered text (not in code) into buttons calling open(n). */
export function linkCitations(root, cites, open) {
  const known = new Set(cites.map((c) => c.index));
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode: (n) => (n.parentElement.closest("code, pre, a, button") ? NodeFilter.FILTER_REJECT
      : /\[\d+(?:\s*,\s*\d+)*\]/.test(n.nodeValue) ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_SKIP),
  });
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const textNode of nodes) {
    const frag = document.createDocumentFragment();
    let last = 0;
    const s = textNode.nodeValue;
    for (const m of s.matchAll(/\[(\d+(?:\s*,\s*\d+)*)\]/g)) {
      const nums = m[1].split(",").map((x) => Number(x.trim()));
      if (!nums.every((n) => known.has(n))) continue;
      frag.append(s.slice(last, m.index));
      nums.forEach((n, i) => {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "cite-ref";
        b.dataset.testid = "citation-ref";
        b.dataset.n = n;
        b.textContent = `[${n}]`;
        b.addEventListener("click", () => open(n));
        if (i) frag.append(" ");
        frag.append(b);
      });
      last = m.index + m[0].length;
    }
    if (!last) continue;
    frag.append(s.slice(last));
    textNode.replaceWith(frag);
  }
}
