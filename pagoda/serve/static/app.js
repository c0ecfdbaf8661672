// Pagoda web chat: streams replies from the OpenAI-compatible API of this server.
// Vanilla ES module; conversations and settings live in localStorage.
import { STRINGS } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";
import { readSSE } from "./sse.js";
import { decorateMessage, initKnowledge, refreshKnowledgeBases, renderKnowledge, selectedKnowledgeBase }
  from "./kb.js";

const LS = {
  conversations: "pagoda.chat.conversations",
  current: "pagoda.chat.current",
  settings: "pagoda.chat.settings",
  apiKey: "pagoda.chat.apiKey",
};

const USER_ICON = '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="8" r="4"/>' +
  '<path d="M4 21c0-4.4 3.6-7 8-7s8 2.6 8 7"/></svg>';
const LOGO_ICON = '<svg viewBox="0 0 32 32" aria-hidden="true"><path d="M16 2l9 6H7zM9 9h14v3H9zM5 13l11-1 ' +
  '11 1-4 3H9zM10 17h12v3H10zM6 21l10-1 10 1-4 3H10zM11 25h10v5H11z"/></svg>';

const $ = (id) => document.getElementById(id);
const el = {
  sidebar: $("sidebar"), scrim: $("scrim"), sidebarToggle: $("sidebar-toggle"),
  newChat: $("new-chat"), list: $("conversation-list"), langToggle: $("lang-toggle"),
  model: $("model-select"), stats: $("stats"), settingsToggle: $("settings-toggle"),
  settings: $("settings"), messages: $("messages"), empty: $("empty"), form: $("composer"),
  input: $("chat-input"), send: $("send"), stop: $("stop"), system: $("system-prompt"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), apiKey: $("api-key"),
};

// ---------------------------------------------------------------- state

function load(key, fallback) {
  try {
    const v = localStorage.getItem(key);
    return v === null ? fallback : JSON.parse(v);
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (err) {
    console.warn("localStorage write failed", err);
  }
}

const settings = Object.assign({
  lang: (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en",
  model: "",
  temperature: 0.7,
  maxTokens: 512,
  system: "",
  showSettings: true,
  knowledgeBase: "",
}, load(LS.settings, {}));

let conversations = load(LS.conversations, []);
if (!Array.isArray(conversations)) conversations = [];
let currentId = load(LS.current, null);
let generation = null; // { controller, convId, message, node }

const t = (key, ...args) => {
  const v = STRINGS[settings.lang][key] ?? STRINGS.en[key] ?? key;
  return typeof v === "function" ? v(...args) : v;
};

const newId = () => (crypto.randomUUID ? crypto.randomUUID()
  : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);

function current() {
  return conversations.find((c) => c.id === currentId);
}

function persist() {
  save(LS.conversations, conversations);
  save(LS.current, currentId);
}

function saveSettings() {
  save(LS.settings, settings);
}

// ---------------------------------------------------------------- language

function applyLanguage() {
  document.documentElement.lang = settings.lang === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of document.querySelectorAll("[data-i18n-placeholder]")) {
    node.placeholder = t(node.dataset.i18nPlaceholder);
  }
  for (const node of document.querySelectorAll("[data-i18n-title]")) {
    node.title = t(node.dataset.i18nTitle);
    node.setAttribute("aria-label", node.title);
  }
  el.langToggle.textContent = settings.lang === "zh" ? "English" : "中文";
  el.langToggle.lang = settings.lang === "zh" ? "en" : "zh";
  renderList();
  renderMessages();
  renderStats();
  renderKnowledge();
}

// ---------------------------------------------------------------- conversations

function createConversation() {
  const conv = {
    id: newId(), title: "", system: el.system.value, messages: [],
    created: Date.now(), updated: Date.now(),
  };
  conversations.unshift(conv);
  currentId = conv.id;
  persist();
  return conv;
}

function newChat() {
  stopGeneration();
  const cur = current();
  if (!cur || cur.messages.length) createConversation();
  renderAll();
  closeSidebar();
  el.input.focus();
}

function selectConversation(id) {
  if (id === currentId) return closeSidebar();
  stopGeneration();
  currentId = id;
  persist();
  renderAll();
  closeSidebar();
}

function deleteConversation(id) {
  if (generation && generation.convId === id) stopGeneration();
  conversations = conversations.filter((c) => c.id !== id);
  if (currentId === id) currentId = conversations[0]?.id ?? null;
  if (!current()) createConversation();
  persist();
  renderAll();
}

function renderList() {
  el.list.replaceChildren();
  const sorted = [...conversations].sort((a, b) => b.updated - a.updated);
  for (const conv of sorted) {
    const li = document.createElement("li");
    li.className = "conversation" + (conv.id === currentId ? " active" : "");
    li.dataset.testid = "conversation-item";
    li.dataset.id = conv.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conversation-open";
    open.dataset.testid = "conversation-open";
    open.title = conv.title || t("untitled");
    const title = document.createElement("span");
    title.className = "conversation-title";
    title.textContent = conv.title || t("untitled");
    const meta = document.createElement("span");
    meta.className = "conversation-meta";
    meta.textContent = t("messages", conv.messages.length);
    open.append(title, meta);
    open.addEventListener("click", () => selectConversation(conv.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "icon-btn conversation-delete";
    del.dataset.testid = "delete-conversation";
    del.title = t("deleteChat");
    del.setAttribute("aria-label", del.title);
    del.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/></svg>';
    del.addEventListener("click", (e) => {
      e.stopPropagation();
      deleteConversation(conv.id);
    });
    li.append(open, del);
    el.list.append(li);
  }
}

// ---------------------------------------------------------------- messages

function messageNode(msg) {
  const node = document.createElement("div");
  node.className = `msg msg-${msg.role}`;
  node.dataset.testid = `message-${msg.role}`;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.innerHTML = msg.role === "user" ? USER_ICON : LOGO_ICON;
  avatar.title = msg.role === "user" ? t("you") : t("assistant");
  const body = document.createElement("div");
  body.className = "msg-body";
  const content = document.createElement("div");
  content.className = msg.role === "user" ? "msg-text" : "markdown";
  content.dataset.testid = "message-content";
  const meta = document.createElement("div");
  meta.className = "msg-meta";
  meta.dataset.testid = "message-meta";
  body.append(content, meta);
  node.append(avatar, body);
  fillMessage(node, msg, false);
  return node;
}

function fillMessage(node, msg, streaming) {
  const content = node.querySelector(".msg-text, .markdown");
  if (msg.role === "user") {
    content.textContent = msg.content;
  } else {
    let html = renderMarkdown(msg.content);
    if (streaming) {
      const caret = '<span class="caret" aria-hidden="true"></span>';
      html = /<\/p>$/.test(html) ? html.replace(/<\/p>$/, `${caret}</p>`) : html + caret;
    }
    content.innerHTML = html;
    for (const b of content.querySelectorAll(".copy-code")) b.textContent = t("copy");
  }
  node.classList.toggle("streaming", streaming);
  node.classList.toggle("has-error", Boolean(msg.error));
  const meta = node.querySelector(".msg-meta");
  meta.replaceChildren();
  if (msg.error) {
    const err = document.createElement("div");
    err.className = "msg-error";
    err.dataset.testid = "message-error";
    err.textContent = msg.error;
    meta.append(err);
  }
  const stats = msg.role === "assistant" && !streaming ? formatStats(msg) : "";
  if (stats) {
    const s = document.createElement("span");
    s.textContent = stats;
    meta.append(s);
  }
  if (msg.role === "assistant" && !streaming && msg.content) {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "link-btn copy-message";
    copy.dataset.testid = "copy-message";
    copy.textContent = t("copy");
    meta.append(copy);
  }
  if (msg.role === "assistant") decorateMessage(node, msg, streaming);
}

function formatStats(msg) {
  if (!msg.stats) return msg.stopped ? t("stopped") : "";
  const { tokens, seconds, ttft, estimated } = msg.stats;
  const parts = [`${estimated ? "~" : ""}${tokens} ${t("tokens")}`];
  if (seconds > 0) parts.push(`${(tokens / seconds).toFixed(1)} ${t("tokPerSec")}`);
  if (ttft != null) parts.push(`${t("ttft")} ${ttft.toFixed(2)} s`);
  if (msg.stopped) parts.push(t("stopped"));
  return parts.join(" · ");
}

function renderMessages() {
  const conv = current();
  const msgs = conv ? conv.messages : [];
  el.messages.replaceChildren(el.empty);
  el.empty.hidden = msgs.length > 0;
  for (const msg of msgs) {
    const node = messageNode(msg);
    if (generation && generation.message === msg) {
      generation.node = node;
      fillMessage(node, msg, true);
    }
    el.messages.append(node);
  }
  el.system.value = conv ? conv.system ?? "" : settings.system;
  scrollToBottom(true);
}

function renderStats() {
  const conv = current();
  const last = conv && [...conv.messages].reverse().find((m) => m.role === "assistant" && m.stats);
  el.stats.textContent = last ? `${t("lastReply")}: ${formatStats(last)}` : "";
}

function renderAll() {
  renderList();
  renderMessages();
  renderStats();
  setBusy(Boolean(generation));
}

let stickToBottom = true;
el.messages.addEventListener("scroll", () => {
  const m = el.messages;
  stickToBottom = m.scrollHeight - m.scrollTop - m.clientHeight < 80;
});

function scrollToBottom(force = false) {
  if (force || stickToBottom) el.messages.scrollTop = el.messages.scrollHeight;
}

// ---------------------------------------------------------------- API

function apiUrl(path) {
  return new URL(path, document.baseURI).toString();
}

function headers() {
  const h = { "Content-Type": "application/json", Accept: "application/json" };
  const key = el.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(resp) {
  let text = "";
  try {
    text = await resp.text();
    const body = JSON.parse(text);
    if (body?.error?.message) text = body.error.message;
    else if (typeof body?.detail === "string") text = body.detail;
  } catch { /* keep raw text */ }
  const msg = `HTTP ${resp.status}${text ? `: ${text}` : ""}`;
  return resp.status === 401 ? `${msg}\n${t("needKey")}` : msg;
}

async function loadModels() {
  try {
    const resp = await fetch(apiUrl("v1/models"), { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const body = await resp.json();
    const ids = (body.data || []).map((m) => m.id);
    el.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (!ids.length) el.model.append(new Option(t("noModels"), ""));
    if (ids.includes(settings.model)) el.model.value = settings.model;
    el.model.title = el.model.value;
  } catch (err) {
    el.model.replaceChildren(new Option(t("modelsFailed"), ""));
    el.model.title = String(err.message || err);
  }
}

async function sendMessage(text) {
  let conv = current() || createConversation();
  conv.system = el.system.value;
  if (!conv.title) conv.title = text.replace(/\s+/g, " ").trim().slice(0, 48);
  conv.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "" };
  conv.messages.push(reply);
  conv.updated = Date.now();
  persist();

  const history = conv.messages.slice(0, -1)
    .filter((m) => !m.error || m.content)
    .map((m) => ({ role: m.role, content: m.content }));
  if (conv.system.trim()) history.unshift({ role: "system", content: conv.system });

  const controller = new AbortController();
  generation = { controller, convId: conv.id, message: reply, node: null };
  renderAll();
  stickToBottom = true;
  scrollToBottom(true);

  const payload = {
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(el.temperature.value),
    max_tokens: Math.max(1, parseInt(el.maxTokens.value, 10) || 512),
  };
  if (el.model.value) payload.model = el.model.value;
  const kb = selectedKnowledgeBase(); // a Pagoda extension: answer from this knowledge base
  if (kb) payload.knowledge_base = kb;

  const start = performance.now();
  let firstToken = null;
  let chunks = 0;
  let usage = null;
  let pending = false;
  const paint = () => {
    pending = false;
    if (generation?.message === reply && generation.node) {
      fillMessage(generation.node, reply, true);
      scrollToBottom();
    }
  };
  try {
    const resp = await fetch(apiUrl("v1/chat/completions"), {
      method: "POST", headers: headers(), body: JSON.stringify(payload), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    await readSSE(resp.body, (data) => {
      if (data.trim() === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      if (chunk.citations) reply.citations = chunk.citations;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        if (firstToken === null) firstToken = performance.now();
        chunks++;
        reply.content += delta;
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      }
      return true;
    });
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;
    else reply.error = err instanceof TypeError ? `${t("networkError")}: ${err.message}` : err.message;
  } finally {
    const seconds = (performance.now() - start) / 1000;
    const tokens = usage?.completion_tokens ?? chunks;
    if (tokens > 0) {
      reply.stats = {
        tokens, seconds, estimated: !usage,
        ttft: firstToken === null ? null : (firstToken - start) / 1000,
      };
    }
    if (generation?.message === reply) generation = null;
    conv.updated = Date.now();
    persist();
    if (conv.id === currentId) renderAll();
    else renderList();
  }
}

function stopGeneration() {
  if (!generation) return;
  const g = generation;
  g.message.stopped = true;
  g.controller.abort();
  generation = null;
  persist();
  setBusy(false);
  if (g.node) fillMessage(g.node, g.message, false);
  renderStats();
}

function setBusy(busy) {
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.send.disabled = busy;
  el.form.classList.toggle("busy", busy);
}

// ---------------------------------------------------------------- layout helpers

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  el.scrim.hidden = !document.body.classList.contains("settings-open");
}

function narrow() {
  return window.matchMedia("(max-width: 1100px)").matches;
}

function applySettingsVisibility() {
  document.body.classList.toggle("settings-hidden", !settings.showSettings);
}

function autosize() {
  el.input.style.height = "auto";
  el.input.style.height = `${Math.min(el.input.scrollHeight, 240)}px`;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const ta = document.createElement("textarea");
    ta.value = text;
    document.body.append(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
  const old = button.textContent;
  button.textContent = t("copied");
  setTimeout(() => { button.textContent = old; }, 1200);
}

// ---------------------------------------------------------------- events

el.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = el.input.value.trim();
  if (!text || generation) return;
  el.input.value = "";
  autosize();
  sendMessage(text);
});

el.input.addEventListener("keydown", (e) => {
  // Do not send while an IME (Chinese, Japanese…) is composing: Enter picks the candidate.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    el.form.requestSubmit();
  }
});
el.input.addEventListener("input", autosize);
el.stop.addEventListener("click", stopGeneration);
el.newChat.addEventListener("click", newChat);

el.langToggle.addEventListener("click", () => {
  settings.lang = settings.lang === "zh" ? "en" : "zh";
  saveSettings();
  applyLanguage();
});

el.sidebarToggle.addEventListener("click", () => {
  document.body.classList.remove("settings-open");
  const open = document.body.classList.toggle("sidebar-open");
  el.scrim.hidden = !open;
});

el.settingsToggle.addEventListener("click", () => {
  if (narrow()) {
    document.body.classList.remove("sidebar-open");
    const open = document.body.classList.toggle("settings-open");
    el.scrim.hidden = !open;
  } else {
    settings.showSettings = !settings.showSettings;
    saveSettings();
    applySettingsVisibility();
  }
});

el.scrim.addEventListener("click", () => {
  document.body.classList.remove("sidebar-open", "settings-open");
  el.scrim.hidden = true;
});

el.messages.addEventListener("click", (e) => {
  const code = e.target.closest(".copy-code");
  if (code) return copyText(code.closest(".code-block").querySelector("code").innerText, code);
  const msgCopy = e.target.closest(".copy-message");
  if (msgCopy) {
    const idx = [...el.messages.querySelectorAll(".msg")].indexOf(msgCopy.closest(".msg"));
    const msg = current()?.messages[idx];
    if (msg) copyText(msg.content, msgCopy);
  }
});

el.system.addEventListener("input", () => {
  const conv = current();
  if (conv) {
    conv.system = el.system.value;
    persist();
  }
  settings.system = el.system.value;
  saveSettings();
});

el.temperature.addEventListener("input", () => {
  settings.temperature = Number(el.temperature.value);
  el.temperatureValue.textContent = settings.temperature.toFixed(2);
  saveSettings();
});

el.maxTokens.addEventListener("change", () => {
  settings.maxTokens = Math.max(1, parseInt(el.maxTokens.value, 10) || 512);
  el.maxTokens.value = settings.maxTokens;
  saveSettings();
});

el.model.addEventListener("change", () => {
  settings.model = el.model.value;
  el.model.title = el.model.value;
  saveSettings();
});

let keyTimer = null;
el.apiKey.addEventListener("input", () => {
  save(LS.apiKey, el.apiKey.value);
  clearTimeout(keyTimer);
  keyTimer = setTimeout(() => {
    loadModels();
    refreshKnowledgeBases({ ifLoaded: true });
  }, 400);
});

window.addEventListener("storage", (e) => {
  if (e.key === LS.conversations && !generation) {
    conversations = load(LS.conversations, []);
    if (!current()) currentId = conversations[0]?.id ?? null;
    if (!current()) createConversation();
    renderAll();
  }
});

window.addEventListener("beforeunload", () => {
  if (generation) persist();
});

// ---------------------------------------------------------------- start

el.temperature.value = settings.temperature;
el.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
el.maxTokens.value = settings.maxTokens;
el.apiKey.value = load(LS.apiKey, "") || "";
// drop half-finished empty replies left by a closed tab
for (const c of conversations) {
  c.messages = (c.messages || []).filter((m) => m.role !== "assistant" || m.content || m.error);
}
if (!current()) currentId = conversations[0]?.id ?? null;
if (!current()) createConversation();
initKnowledge({ t, headers, apiUrl, errorMessage, settings, saveSettings });
applySettingsVisibility();
applyLanguage();
setBusy(false);
loadModels();
el.input.focus();
document.body.dataset.ready = "true";
