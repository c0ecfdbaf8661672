"""The web chat UI in a real browser: headless Debian Chromium driven by Playwright, against the
real server (`create_app` over the real SmolLM2-135M-Instruct) on 127.0.0.1.

Screenshots of the page are written to $PAGODA_UI_SCREENSHOTS (default: the temp folder) as
pagoda-web-ui-*.png so a person can look at them.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = Path(os.environ.get("PAGODA_UI_SCREENSHOTS", tempfile.gettempdir()))
API_KEY = "sk-ui-test"

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(300)]

if not CHROMIUM.exists():
    pytest.skip("the web UI test needs Debian's Chromium at /usr/bin/chromium "
                "(`make test` installs it: apt-get install chromium fonts-wqy-microhei)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the web UI test needs the `playwright` Python package "
                                      "(dev extra)")
expect = sync_api.expect


# ---------------------------------------------------------------- browser
# The servers come from tests/serve/conftest.py: `smol_server` (the real model, no auth) and
# `start_server(loaded, settings)` (here: the real model with an API key).

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own localStorage) at 1280×860; fails the test on any page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US")
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(30_000)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_chat(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")


def tid(page, name: str):
    return page.get_by_test_id(name)


def set_generation(page, *, temperature: float, max_tokens: int) -> None:
    tid(page, "temperature").evaluate(
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(temperature))
    tid(page, "max-tokens").fill(str(max_tokens))
    tid(page, "max-tokens").dispatch_event("change")


def watch_reply_growth(page) -> None:
    """Record the length of the last assistant reply at every DOM change into window.__lens."""
    page.evaluate("""() => {
        window.__lens = [];
        const root = document.querySelector('[data-testid=messages]');
        new MutationObserver(() => {
            const all = root.querySelectorAll('[data-testid=message-assistant] [data-testid=message-content]');
            if (all.length) window.__lens.push(all[all.length - 1].textContent.length);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")


def last_reply(page):
    return tid(page, "message-assistant").last.get_by_test_id("message-content")


def send(page, text: str) -> None:
    tid(page, "chat-input").fill(text)
    tid(page, "send").click()


# ---------------------------------------------------------------- tests

def test_page_is_served_with_its_assets(smol_server, page):
    for asset, kind in [("/", "text/html"), ("/app.js", "javascript"), ("/markdown.js", "javascript"),
                        ("/i18n.js", "javascript"), ("/sse.js", "javascript"),
                        ("/kb.js", "javascript"),
                        ("/style.css", "text/css")]:
        r = smol_server.http.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    open_chat(page, smol_server.base_url)
    expect(page).to_have_title("Pagoda Chat")
    # the first model /v1/models lists (the served one, before its aliases) is picked
    expect(tid(page, "model-select")).to_have_value(smol_server.state.model_id)
    expect(tid(page, "empty-state")).to_be_visible()
    expect(tid(page, "conversation-item")).to_have_count(1)
    expect(tid(page, "stop")).to_be_hidden()
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-empty.png"))


def test_stream_stop_and_conversations(smol_server, page):
    open_chat(page, smol_server.base_url)
    watch_reply_growth(page)

    # 1. a streamed answer appears and grows token by token
    set_generation(page, temperature=0, max_tokens=48)
    send(page, "Tell me about Paris, the capital of France, in a few sentences.")
    expect(tid(page, "message-user")).to_contain_text("capital of France")
    expect(tid(page, "stop")).to_be_visible()
    expect(tid(page, "send")).to_be_visible(timeout=120_000)  # generation finished
    expect(tid(page, "stop")).to_be_hidden()
    reply = last_reply(page).inner_text()
    assert reply.strip(), "the assistant reply is empty"
    lens = [n for n in page.evaluate("window.__lens") if n > 0]
    assert len(set(lens)) >= 3, f"the reply did not stream (lengths seen: {lens})"
    assert lens == sorted(lens), f"the streamed text shrank: {lens}"
    expect(tid(page, "stats")).to_contain_text(re.compile(r"\d+ tokens · [\d.]+ tok/s"))
    expect(tid(page, "message-assistant").last.get_by_test_id("message-meta")).to_contain_text("tok/s")
    expect(tid(page, "conversation-item")).to_have_count(1)
    expect(tid(page, "conversation-item").first).to_contain_text("Tell me about Paris")
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-reply.png"))

    # 2. Stop during a long generation: the button resets and the text stops growing
    set_generation(page, temperature=0, max_tokens=4000)
    send(page, "Write a very long story about a dragon who learns to cook. Use many chapters.")
    page.wait_for_function("""() => {
        const all = document.querySelectorAll('[data-testid=message-assistant] [data-testid=message-content]');
        return all.length === 2 && all[1].textContent.length > 40;
    }""", timeout=120_000)
    expect(tid(page, "stop")).to_be_visible()  # still generating
    tid(page, "stop").click()
    expect(tid(page, "stop")).to_be_hidden(timeout=2_000)
    expect(tid(page, "send")).to_be_visible()
    expect(tid(page, "send")).to_be_enabled()
    stopped_text = last_reply(page).inner_text()
    page.wait_for_timeout(1500)
    assert last_reply(page).inner_text() == stopped_text, "text kept growing after Stop"
    expect(tid(page, "message-assistant").last.get_by_test_id("message-meta")).to_contain_text("stopped")
    smol_server.wait_idle()  # the aborted fetch cancelled the generation and freed its KV blocks
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-stopped.png"))

    # 3. New chat: two conversations in the list, the new one empty and active
    tid(page, "new-chat").click()
    expect(tid(page, "conversation-item")).to_have_count(2)
    expect(tid(page, "empty-state")).to_be_visible()
    expect(tid(page, "message-user")).to_have_count(0)
    tid(page, "new-chat").click()  # an empty chat is reused, not duplicated
    expect(tid(page, "conversation-item")).to_have_count(2)

    # the list survives a reload (localStorage); switching restores the old messages
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(tid(page, "conversation-item")).to_have_count(2)
    page.locator("[data-testid=conversation-item]", has_text="capital of France") \
        .get_by_test_id("conversation-open").click()
    expect(tid(page, "message-user")).to_have_count(2)
    expect(tid(page, "message-assistant").first).to_contain_text(reply.strip()[:20])

    # delete the old conversation
    item = page.locator("[data-testid=conversation-item]", has_text="capital of France")
    item.hover()
    item.get_by_test_id("delete-conversation").click()
    expect(tid(page, "conversation-item")).to_have_count(1)
    expect(tid(page, "message-user")).to_have_count(0)


def test_narrow_screen_layout(smol_server, browser):
    context = browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True)
    page = context.new_page()
    open_chat(page, smol_server.base_url)
    expect(tid(page, "chat-input")).to_be_in_viewport()
    expect(tid(page, "sidebar")).not_to_be_in_viewport()
    expect(tid(page, "settings")).not_to_be_in_viewport()
    tid(page, "sidebar-toggle").click()
    expect(tid(page, "new-chat")).to_be_in_viewport()
    page.wait_for_timeout(300)  # the slide-in transition
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-narrow-menu.png"))
    tid(page, "scrim").click(position={"x": 380, "y": 400})
    expect(tid(page, "sidebar")).not_to_be_in_viewport()
    tid(page, "settings-toggle").click()
    expect(tid(page, "system-prompt")).to_be_in_viewport()
    context.close()


def test_chinese_ui(smol_server, page):
    open_chat(page, smol_server.base_url)
    expect(tid(page, "lang-toggle")).to_have_text("中文")
    tid(page, "lang-toggle").click()
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    expect(tid(page, "send")).to_have_text("发送")
    expect(tid(page, "new-chat")).to_contain_text("新对话")
    expect(tid(page, "chat-input")).to_have_attribute("placeholder", "输入消息…")
    expect(tid(page, "lang-toggle")).to_have_text("English")
    expect(tid(page, "settings")).to_contain_text("系统提示词")

    tid(page, "system-prompt").fill("你是一个乐于助人的助手，请用中文回答。")
    set_generation(page, temperature=0, max_tokens=32)
    send(page, "你好！请介绍一下你自己。")
    expect(tid(page, "message-user").get_by_test_id("message-content")).to_have_text(
        "你好！请介绍一下你自己。")
    expect(tid(page, "send")).to_be_visible(timeout=120_000)
    expect(tid(page, "stats")).to_contain_text("词元/秒")
    expect(tid(page, "conversation-item").first).to_contain_text("你好")
    # a CJK font is in the stack and installed: the glyphs are not drawn as fallback boxes
    assert "WenQuanYi Micro Hei" in page.evaluate("getComputedStyle(document.body).fontFamily")
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-zh.png"))

    # the choice is remembered
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(tid(page, "send")).to_have_text("发送")
    tid(page, "lang-toggle").click()
    expect(tid(page, "send")).to_have_text("Send")


def test_api_key_is_sent_as_bearer(smol, start_server, page):
    from pagoda.serve import ServeSettings

    keyed = start_server(smol, ServeSettings(api_keys=[API_KEY], default_max_tokens=48))
    open_chat(page, keyed.base_url)
    # without the key the models cannot be listed and a message gets a 401 explained
    expect(tid(page, "model-select")).to_have_value("")
    set_generation(page, temperature=0, max_tokens=8)
    send(page, "Hello")
    expect(tid(page, "message-error")).to_contain_text("401")
    expect(tid(page, "message-error")).to_contain_text("API key")
    expect(tid(page, "send")).to_be_visible()

    tid(page, "api-key").fill(API_KEY)
    expect(tid(page, "model-select")).to_have_value(keyed.state.model_id)
    tid(page, "new-chat").click()
    send(page, "Hello")
    expect(tid(page, "send")).to_be_visible(timeout=120_000)
    expect(tid(page, "message-error")).to_have_count(0)
    assert last_reply(page).inner_text().strip()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(tid(page, "api-key")).to_have_value(API_KEY)  # kept in localStorage


def test_markdown_is_rendered_safely(smol_server, page):
    open_chat(page, smol_server.base_url)
    html = page.evaluate("""async () => {
        const { renderMarkdown } = await import('./markdown.js');
        const md = [
            '# Title', '', 'Some **bold**, *italic* and `x < y` code.', '',
            '- one', '- two', '  - nested', '', '1. first', '2. second', '',
            '```python', 'def f():', '    return "<b>"', '```', '',
            '| a | b |', '|---|---|', '| 1 | 2 |', '',
            '<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 1">',
            '[ok](https://example.com) [bad](javascript:window.__pwned=1)',
        ].join('\\n');
        const div = document.createElement('div');
        div.innerHTML = renderMarkdown(md);
        document.body.append(div);
        await new Promise((r) => setTimeout(r, 100));
        return {
            pwned: window.__pwned || 0,
            tags: [...div.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
            hrefs: [...div.querySelectorAll('a')].map((a) => a.getAttribute('href')),
            code: div.querySelector('pre code').textContent,
        };
    }""")
    assert html["pwned"] == 0
    tags = set(html["tags"])
    assert {"h1", "strong", "em", "code", "ul", "ol", "li", "pre", "table", "a"} <= tags
    assert not tags & {"script", "img", "iframe"}
    assert html["hrefs"] == ["https://example.com"]
    assert html["code"] == 'def f():\n    return "<b>"'


def test_sse_reader_handles_split_chunks(smol_server, page):
    open_chat(page, smol_server.base_url)
    got = page.evaluate("""async () => {
        const { readSSE } = await import('./sse.js');
        const wire = 'data: {"a":1}\\r\\n\\r\\n: comment\\n\\ndata: {"b":"你好"}\\n\\ndata: [DONE]\\n\\ndata: late\\n\\n';
        const bytes = new TextEncoder().encode(wire);
        const body = new ReadableStream({ start(c) {   // 3-byte pieces split lines and characters
            for (let i = 0; i < bytes.length; i += 3) c.enqueue(bytes.slice(i, i + 3));
            c.close();
        } });
        const seen = [];
        await readSSE(body, (d) => { seen.push(d); return d !== '[DONE]'; });
        return seen;
    }""")
    assert got == ['{"a":1}', '{"b":"你好"}', "[DONE]"]


LEAVE_MD = b"# Parental leave\n\nEmployees get 16 weeks of paid parental leave.\n"
OFFICE_MD = b"# Office\n\nThe office closes between Christmas and New Year.\n"


def test_knowledge_base_panel(smol, start_server, page, tmp_path):
    """Create a knowledge base, upload two files, chat grounded on it and open a citation."""
    from pagoda.serve import ServeSettings

    live = start_server(smol, ServeSettings(milvus_uri=str(tmp_path / "kb.db"),
                                            kb_dir=str(tmp_path / "kb"), default_max_tokens=32))
    open_chat(page, live.base_url)
    expect(tid(page, "kb-select")).to_have_value("")  # no knowledge base: a plain chat
    expect(tid(page, "kb-upload")).to_be_hidden()
    page.wait_for_timeout(300)
    assert live.state.knowledge._kbs is None, "opening the chat started the vector database"

    # create one: it becomes the chat's knowledge base (the topbar says so)
    tid(page, "kb-name").fill("handbook")
    tid(page, "kb-create-btn").click()
    expect(tid(page, "kb-select")).to_have_value("handbook", timeout=120_000)
    expect(tid(page, "kb-status")).to_contain_text("handbook")
    expect(tid(page, "kb-badge")).to_have_text("handbook")
    # an API error shows as its message, not as JSON: the name is taken
    tid(page, "kb-name").fill("handbook")
    tid(page, "kb-create-btn").click()
    expect(tid(page, "kb-status")).to_contain_text("already exists")
    expect(tid(page, "kb-status")).not_to_contain_text("{")

    # upload two files at once: progress, then both listed with their chunks
    page.evaluate("""() => {
        window.__progress = [];
        const node = document.querySelector('[data-testid=kb-progress-text]');
        new MutationObserver(() => window.__progress.push(node.textContent))
            .observe(node, {subtree: true, childList: true, characterData: true});
    }""")
    tid(page, "kb-files").set_input_files([
        {"name": "office.md", "mimeType": "text/markdown", "buffer": OFFICE_MD},
        {"name": "leave.md", "mimeType": "text/markdown", "buffer": LEAVE_MD}])
    expect(tid(page, "kb-document")).to_have_count(2, timeout=120_000)
    expect(tid(page, "kb-documents")).to_contain_text("office.md")
    expect(tid(page, "kb-documents")).to_contain_text("leave.md")
    expect(tid(page, "kb-status")).to_contain_text("leave.md: added")
    expect(tid(page, "kb-progress")).to_be_hidden()
    seen = page.evaluate("window.__progress")
    assert any(re.search(r"Uploading 2 files… \d+%", s) for s in seen), seen
    assert "Indexing…" in seen, seen
    expect(tid(page, "kb-select")).to_contain_text("handbook (2 docs)")
    # a file the server cannot read is reported by name, the others are kept
    tid(page, "kb-files").set_input_files([
        {"name": "tool.exe", "mimeType": "application/octet-stream", "buffer": b"MZ\x90\x00binary"}])
    expect(tid(page, "kb-status")).to_contain_text("tool.exe: ")
    expect(tid(page, "kb-status")).to_have_attribute("data-kind", "error")
    expect(tid(page, "kb-document")).to_have_count(2)

    # a grounded chat: the answer cites leave.md; clicking the citation shows the passage
    set_generation(page, temperature=0, max_tokens=32)
    send(page, "How many weeks of paid parental leave do employees get?")
    expect(tid(page, "send")).to_be_visible(timeout=120_000)
    expect(tid(page, "message-error")).to_have_count(0)
    assert last_reply(page).inner_text().strip()
    reply = tid(page, "message-assistant").last
    first = reply.get_by_test_id("citation").first
    expect(first).to_contain_text("[1] leave.md")
    expect(reply.get_by_test_id("citation-passage")).to_be_hidden()
    first.click()
    expect(reply.get_by_test_id("citation-passage")).to_be_visible()
    expect(reply.get_by_test_id("citation-text")).to_contain_text("16 weeks of paid parental leave")
    expect(reply.get_by_test_id("citation-passage")).to_contain_text("leave.md")
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-kb.png"))
    first.click()  # a second click closes it
    expect(reply.get_by_test_id("citation-passage")).to_be_hidden()

    # [n] markers in an answer are buttons opening the passage (the small model may not write
    # any, so check the rendering on a known text too)
    page.evaluate("""async () => {
        const { linkCitations } = await import('./kb.js');
        const div = document.createElement('div');
        div.id = 'cite-check';
        div.innerHTML = '<p>Sixteen weeks [1]. Also [1, 2] and [7] and <code>[1]</code>.</p>';
        document.body.append(div);
        window.__opened = [];
        linkCitations(div, [{index: 1}, {index: 2}], (n) => window.__opened.push(n));
    }""")
    refs = page.locator("#cite-check [data-testid=citation-ref]")
    expect(refs).to_have_count(3)  # [1], [1, 2] -> two; not [7] (no such passage) nor in code
    refs.nth(2).click()
    assert page.evaluate("window.__opened") == [2]
    expect(page.locator("#cite-check")).to_contain_text("[7]")

    # citations survive a reload; removing a document updates the list
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(tid(page, "kb-select")).to_have_value("handbook")
    expect(tid(page, "message-assistant").last.get_by_test_id("citation").first) \
        .to_contain_text("leave.md")
    page.once("dialog", lambda d: d.accept())
    page.locator("[data-testid=kb-document]", has_text="office.md") \
        .get_by_test_id("kb-document-remove").click()
    expect(tid(page, "kb-document")).to_have_count(1)
    expect(tid(page, "kb-documents")).to_contain_text("leave.md")

    # the panel speaks Chinese too
    tid(page, "lang-toggle").click()
    expect(tid(page, "kb-panel")).to_contain_text("知识库")
    expect(tid(page, "kb-upload")).to_contain_text("上传文件")
    tid(page, "kb-panel").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "pagoda-web-ui-kb-zh.png"))
    tid(page, "kb-select").select_option("")
    expect(tid(page, "kb-upload")).to_be_hidden()
    expect(tid(page, "kb-badge")).to_be_hidden()
