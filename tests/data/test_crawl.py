"""The crawler against a small site served on 127.0.0.1: breadth first, depth and page limits,
robots.txt, domains, content types, redirects, politeness, no revisits, one-line errors."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pagoda.data.collect import CollectReport
from pagoda.data.crawl import CrawlConfig, crawl, normalize_url
from pagoda.errors import ConfigError, DocumentError


def page(title: str, body: str, *links: str, head: str = "") -> str:
    anchors = "".join(f'<a href="{href}">link</a> ' for href in links)
    return (f"<html><head><title>{title}</title>{head}</head>"
            f"<body><p>{body}</p><p>{anchors}</p></body></html>")


SITE = {  # path -> content; depth from index.html in the comments
    "index.html": page("Home", "Welcome home.", "a.html", "a.html#part", "/b.html", "sub/c.html",
                       "#top", "mailto:x@example.org", "notes.txt", "data.pdf", "missing.html",
                       "private/secret.html", "http://example.invalid/", "moved"),
    "a.html": page("A", "Page a.", "index.html", "deep.html", "./b.html"),  # 1
    "b.html": page("B", "Page b.", "/index.html"),  # 1
    "sub/c.html": page("C", "Page c.", "../a.html", "d.html"),  # 1
    "sub/d.html": page("D", "Page d."),  # 2
    "deep.html": page("Deep", "Deeper still.", "deepest.html"),  # 2
    "deepest.html": page("Deepest", "The bottom."),  # 3
    "notes.txt": "Plain notes.\n",  # 1
    "data.pdf": "%PDF-1.4 not really\n",  # 1
    "private/secret.html": page("Secret", "Hidden."),  # 1, disallowed
    "moved/index.html": page("Moved", "After a redirect."),  # 1, /moved -> /moved/
    "robots.txt": "User-agent: *\nDisallow: /private/\n",
}


class Site:
    """A folder served over HTTP on 127.0.0.1; `requests` logs (path, time) in arrival order."""

    def __init__(self, root: Path) -> None:
        self.requests: list[tuple[str, float]] = []
        log = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                log.append((self.path, time.monotonic()))
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[[dict[str, str]], Site]]:
    """Serves a dict of files (path -> content) from a fresh folder; stopped after the test."""
    sites: list[Site] = []

    def start(files: dict[str, str]) -> Site:
        root = tmp_path / f"site{len(sites)}"
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(content)
        sites.append(Site(root))
        return sites[-1]

    yield start
    for site in sites:
        site.server.shutdown()
        site.server.server_close()


@pytest.fixture
def site(serve) -> Site:
    return serve(SITE)


def run(seeds: list[str], **config) -> tuple[list, CollectReport]:
    report = CollectReport()
    records = list(crawl(seeds, CrawlConfig(**{"delay": 0.0, **config}), report))
    return records, report


def test_breadth_first_relative_links_without_revisits(site):
    records, report = run([site.url + "index.html"], max_depth=1)
    sources = [r.source.removeprefix(site.url) for r in records]
    assert sources == ["index.html", "a.html", "b.html", "sub/c.html", "notes.txt", "moved/"]
    assert "#" not in "".join(sources)
    page_paths = [p for p in site.paths if p != "/robots.txt"]
    assert len(page_paths) == len(set(page_paths))  # nothing fetched twice
    assert site.paths.count("/robots.txt") == 1
    home = records[0]
    assert home.text.startswith("Welcome home.")
    assert home.meta == {"format": "html", "url": site.url + "index.html", "depth": 0,
                         "status": 200, "bytes": len(SITE["index.html"]), "title": "Home"}
    assert records[1].meta["depth"] == 1
    assert records[4].meta["format"] == "txt" and records[4].text == "Plain notes.\n"
    assert report.skipped == [
        ("http://example.invalid/", "off-domain"),
        (site.url + "data.pdf", "content type application/pdf"),
        (site.url + "missing.html", "HTTP 404"),
        (site.url + "private/secret.html", "disallowed by robots.txt"),
    ]


def test_depth_limit(site):
    assert [r.source for r in run([site.url + "index.html"], max_depth=0)[0]] == [
        site.url + "index.html"]
    records, _ = run([site.url + "index.html"], max_depth=3)
    depths = {r.source.removeprefix(site.url): r.meta["depth"] for r in records}
    assert depths["deep.html"] == 2 and depths["sub/d.html"] == 2
    assert depths["deepest.html"] == 3
    assert "deepest.html" not in {r.source.removeprefix(site.url)
                                  for r in run([site.url + "index.html"], max_depth=2)[0]}


def test_max_pages_counts_page_requests(site):
    records, _ = run([site.url + "index.html"], max_depth=3, max_pages=3)
    assert [r.source.removeprefix(site.url) for r in records] == ["index.html", "a.html",
                                                                  "b.html"]
    assert [p for p in site.paths if p != "/robots.txt"] == ["/index.html", "/a.html", "/b.html"]


def test_robots_disallow_is_never_fetched_and_agent_specific(serve):
    files = {"index.html": page("I", "Index.", "open.html", "closed.html"),
             "open.html": page("O", "Open."), "closed.html": page("C", "Closed."),
             "robots.txt": "User-agent: PagodaBot\nDisallow: /closed\n\n"
                           "User-agent: *\nDisallow: /\n"}
    site = serve(files)
    records, report = run([site.url + "index.html"])
    assert [r.source.removeprefix(site.url) for r in records] == ["index.html", "open.html"]
    assert "/closed.html" not in site.paths
    assert report.skipped == [(site.url + "closed.html", "disallowed by robots.txt")]
    other_agent, report = run([site.url + "index.html"], user_agent="OtherBot")
    assert other_agent == []
    assert report.skipped == [(site.url + "index.html", "disallowed by robots.txt")]


def test_missing_robots_txt_allows_everything(serve):
    files = {"index.html": page("I", "Index.", "other.html"), "other.html": page("O", "Other.")}
    site = serve(files)
    records, report = run([site.url])  # "/" serves index.html
    assert [r.source for r in records] == [site.url, site.url + "other.html"]
    assert report.skipped == []
    assert site.paths == ["/robots.txt", "/", "/other.html"]


def test_allowed_domains_replace_the_seed_hosts(site):
    records, report = run([site.url + "index.html"], allowed_domains=("example.org",))
    assert records == []
    assert report.skipped == [(site.url + "index.html", "off-domain")]
    assert site.paths == []


def test_meta_robots_noindex_and_nofollow(serve):
    files = {"index.html": page("I", "Index.", "quiet.html", "closed.html"),
             "quiet.html": page("Q", "Quiet.", "far.html",
                                head='<meta name="robots" content="noindex">'),
             "closed.html": page("C", "Closed.", "never.html",
                                 head='<meta name="robots" content="nofollow">'),
             "far.html": page("F", "Far."), "never.html": page("N", "Never.")}
    site = serve(files)
    records, report = run([site.url + "index.html"])
    assert [r.source.removeprefix(site.url) for r in records] == [
        "index.html", "closed.html", "far.html"]  # quiet.html's links are still followed
    assert report.skipped == [(site.url + "quiet.html", "noindex")]
    assert "/never.html" not in site.paths


def test_politeness_delay_spaces_requests_to_one_host(serve):
    files = {"index.html": page("I", "Index.", "a.html"), "a.html": page("A", "A.")}
    site = serve(files)
    report = CollectReport()
    list(crawl([site.url + "index.html"], CrawlConfig(delay=0.15), report))
    times = [t for _, t in site.requests]
    assert len(times) == 3  # robots.txt and two pages
    # the wait runs from the end of the last answer, so the server sees at least the delay
    assert all(b - a >= 0.15 for a, b in zip(times, times[1:], strict=False))


def test_pages_over_max_bytes_are_skipped(serve):
    files = {"index.html": page("I", "Index.", "big.txt"), "big.txt": "x" * 5000}
    site = serve(files)
    records, report = run([site.url + "index.html"], max_bytes=1000)
    assert [r.source for r in records] == [site.url + "index.html"]
    assert report.skipped == [(site.url + "big.txt", "larger than 1000 bytes")]


def test_unreachable_network_is_one_readable_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DocumentError, match="no server answered the crawl") as error:
        list(crawl([f"http://127.0.0.1:{port}/"], CrawlConfig(delay=0.0, timeout=2)))
    assert "\n" not in str(error.value) and f"127.0.0.1:{port}" in str(error.value)


def test_seeds_and_limits_are_checked_up_front():
    with pytest.raises(DocumentError, match="not an http"):
        crawl(["ftp://example.org/"])
    with pytest.raises(DocumentError, match="no seed"):
        crawl([])
    with pytest.raises(ConfigError):
        CrawlConfig(max_pages=0)


@pytest.mark.parametrize(("url", "normal"), [
    ("HTTP://Example.ORG:80/a?b=1#frag", "http://example.org/a?b=1"),
    ("https://example.org", "https://example.org/"),
    ("https://example.org:8443/x", "https://example.org:8443/x"),
    ("http://[::1]:8000/", "http://[::1]:8000/"),
    ("mailto:x@example.org", None),
    ("javascript:void(0)", None),
    ("http://a\x00b/", None),
    ("http://example.org:99999/", None),
])
def test_normalize_url(url, normal):
    assert normalize_url(url) == normal
