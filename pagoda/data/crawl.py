"""A small breadth-first web crawler: seed URLs in, one `Record` per HTML or plain-text page out.

Polite by default, because the pages belong to someone else: each host's robots.txt is read
once, through the same client, and obeyed (its Crawl-delay too); requests to one host are
spaced by `delay` seconds; only the seeds' hosts (or the configured domains) are crawled; no URL
is fetched twice. A page that cannot be used (disallowed, off-domain, an HTTP error, another
content type, too big) is skipped and reported, not fatal; only a crawl in which no server
answered at all raises, in one readable line, since then the network or the URLs are wrong.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

import httpx

from pagoda.data.record import Record
from pagoda.errors import ConfigError, DocumentError
from pagoda.rag.loaders import load_html, load_text

if TYPE_CHECKING:
    from pagoda.data.collect import CollectReport

PAGE_FORMATS = {"text/html": "html", "text/plain": "txt"}  # content types kept -> format
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class CrawlConfig:
    """How far and how fast to crawl.

    `delay` is the pause between two requests to one host: 0.5 s by default, gentle on small
    sites; a longer robots.txt Crawl-delay wins. Empty `allowed_domains` means exactly the seeds'
    hosts; a listed domain also admits its subdomains.
    """

    max_depth: int = 2  # link hops from a seed (seeds are depth 0)
    max_pages: int = 100  # page requests, robots.txt not counted
    allowed_domains: tuple[str, ...] = ()
    user_agent: str = "PagodaBot"
    delay: float = 0.5
    timeout: float = 10.0  # seconds, per request
    max_bytes: int = 5_000_000  # larger pages are skipped

    def __post_init__(self) -> None:
        if self.max_depth < 0 or self.max_pages < 1 or self.delay < 0 or self.timeout <= 0:
            raise ConfigError(f"crawl limits must be max_depth >= 0, max_pages >= 1, delay >= 0 "
                              f"and timeout > 0, not {self}")


def crawl(seeds: Sequence[str], config: CrawlConfig | None = None,
          report: CollectReport | None = None) -> Iterator[Record]:
    """Pages reachable from `seeds`, breadth first; skipped URLs go to `report` with a reason.

    Seeds are checked now (`DocumentError` for one that is not an http(s) URL); the crawl runs
    as the records are consumed.
    """
    urls = []
    for seed in seeds:
        if (url := normalize_url(seed)) is None:
            raise DocumentError(f"{seed}: not an http:// or https:// URL with a host")
        urls.append(url)
    if not urls:
        raise DocumentError("no seed URLs to crawl")
    return _Crawler(config or CrawlConfig(), report).run(urls)


def normalize_url(url: str) -> str | None:
    """One spelling per page: no #fragment, lower-case scheme and host, no default port, path
    at least "/". None unless it is an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in DEFAULT_PORTS or not host:
            return None
        netloc = f"[{host}]" if ":" in host else host
        if port is not None and port != DEFAULT_PORTS[scheme]:
            netloc += f":{port}"
        normal = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        httpx.URL(normal)  # what httpx cannot request (a space in the host, ...) is no link
    except (ValueError, httpx.InvalidURL):
        return None
    return normal


def _origin(url: str) -> str:
    scheme, netloc, *_ = urlsplit(url)
    return f"{scheme}://{netloc}"


class _Crawler:
    """One crawl's state: the frontier, the URLs seen, each host's rules and last answer."""

    def __init__(self, config: CrawlConfig, report: CollectReport | None) -> None:
        self.config, self.report = config, report
        self.queue: deque[tuple[str, int]] = deque()  # (url, depth), breadth first
        self.seen: set[str] = set()
        self.hosts: set[str] = set()  # the seeds' hosts, when no domains are configured
        self.rules: dict[str, RobotFileParser | None] = {}  # origin -> robots.txt; None: no answer
        self.last_done: dict[str, float] = {}  # origin -> time.monotonic() its last answer ended
        self.answered = False  # some server answered something
        self.failure = ""  # the first request that got no answer, and why

    def run(self, seeds: list[str]) -> Iterator[Record]:
        self.hosts = {urlsplit(url).hostname or "" for url in seeds}
        for url in seeds:
            self._enqueue(url, 0)
        headers = {"User-Agent": self.config.user_agent}
        with httpx.Client(headers=headers, timeout=self.config.timeout) as self.client:
            requests = 0
            while self.queue and requests < self.config.max_pages:
                url, depth = self.queue.popleft()
                rules = self._robots(_origin(url))
                if rules is None:
                    self._skip(url, "host unreachable")
                    continue
                if not rules.can_fetch(self.config.user_agent, url):
                    self._skip(url, "disallowed by robots.txt")
                    continue
                requests += 1
                record = self._visit(url, depth, rules.crawl_delay(self.config.user_agent))
                if record is not None:
                    yield record
        if self.failure and not self.answered:
            raise DocumentError(f"no server answered the crawl ({self.failure}); "
                                "check the URLs and the network connection")

    def _enqueue(self, url: str, depth: int) -> None:
        if url in self.seen:
            return
        self.seen.add(url)
        if self._on_domain(urlsplit(url).hostname or ""):
            self.queue.append((url, depth))
        else:
            self._skip(url, "off-domain")

    def _on_domain(self, host: str) -> bool:
        if not self.config.allowed_domains:
            return host in self.hosts
        return any(host == domain or host.endswith(f".{domain}")
                   for domain in (d.lower().strip(".") for d in self.config.allowed_domains))

    def _robots(self, origin: str) -> RobotFileParser | None:
        """The host's robots.txt, read on its first URL; a missing one (4xx) allows everything,
        401/403 forbid everything (as urllib.robotparser.read does)."""
        if origin in self.rules:
            return self.rules[origin]
        rules: RobotFileParser | None = RobotFileParser(f"{origin}/robots.txt")
        try:
            with self._polite(origin, self.config.delay):
                response = self.client.get(f"{origin}/robots.txt", follow_redirects=True)
        except httpx.HTTPError as e:
            self._failed(f"{origin}/robots.txt", e)
            rules = None
        else:
            self.answered = True
            if response.status_code in (401, 403):
                rules.disallow_all = True
            elif response.status_code >= 400:
                rules.allow_all = True
            else:
                rules.parse(response.text.splitlines())
        self.rules[origin] = rules
        return rules

    @contextmanager
    def _polite(self, origin: str, delay: float) -> Iterator[None]:
        """Around a request: first sleep until `delay` seconds have passed since the last
        answer from `origin` ended (a slow server is asked less often), then note this one."""
        if (last := self.last_done.get(origin)) is not None:
            time.sleep(max(0.0, last + delay - time.monotonic()))
        try:
            yield
        finally:
            self.last_done[origin] = time.monotonic()

    def _visit(self, url: str, depth: int, crawl_delay: float | None) -> Record | None:
        """GET `url`: a redirect or the page's links go to the frontier; the page's text comes
        back as a record, or None (reported) when the page is not usable."""
        delay = max(self.config.delay, float(crawl_delay or 0))
        try:
            with self._polite(_origin(url), delay), self.client.stream("GET", url) as response:
                self.answered = True
                if response.is_redirect:  # followed here, so robots and domains apply to it
                    target = normalize_url(urljoin(url, response.headers["location"]))
                    if target is not None:
                        self._enqueue(target, depth)
                    return None
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if response.status_code != 200:
                    return self._skip(url, f"HTTP {response.status_code}")
                if kind not in PAGE_FORMATS:
                    return self._skip(url, f"content type {kind or '(none)'}")
                body = self._read(response)
        except httpx.HTTPError as e:
            self._failed(url, e)
            return self._skip(url, f"request failed ({type(e).__name__})")
        if body is None:
            return self._skip(url, f"larger than {self.config.max_bytes} bytes")
        text = body.decode(response.encoding or "utf-8", errors="replace")
        return self._page(url, depth, PAGE_FORMATS[kind], text, len(body))

    def _read(self, response: httpx.Response) -> bytes | None:
        """The body, or None once it passes max_bytes (the rest is never downloaded)."""
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.config.max_bytes:
                return None
        return bytes(body)

    def _page(self, url: str, depth: int, fmt: str, text: str, size: int) -> Record | None:
        """The page's record; an HTML page's links join the frontier unless it says nofollow,
        and it gives no record if it says noindex."""
        meta = {"format": fmt, "url": url, "depth": depth, "status": 200, "bytes": size}
        if fmt == "html":
            from bs4 import BeautifulSoup

            soup = BeautifulSoup(text, "html.parser")
            robots_meta = soup.find("meta", attrs={"name": "robots"})
            directives = str(robots_meta.get("content", "")).lower() if robots_meta else ""
            if "nofollow" not in directives and depth < self.config.max_depth:
                base = soup.find("base", href=True)
                base_url = urljoin(url, str(base["href"])) if base else url
                for link in soup.find_all("a", href=True):
                    if (target := normalize_url(urljoin(base_url, str(link["href"])))):
                        self._enqueue(target, depth + 1)
            if "noindex" in directives:
                return self._skip(url, "noindex")
            if soup.title and (title := " ".join(soup.title.get_text().split())):
                meta["title"] = title
        load = load_html if fmt == "html" else load_text
        try:
            document = load(text.encode("utf-8"), url)
        except DocumentError:
            return self._skip(url, "no text")
        if not document.sections:
            return self._skip(url, "no text")
        return Record(document.text, url, meta)

    def _failed(self, url: str, error: httpx.HTTPError) -> None:
        if not self.failure:
            self.failure = f"{url}: {type(error).__name__}: {' '.join(str(error).split())}"

    def _skip(self, url: str, reason: str) -> None:
        if self.report is not None:
            self.report.skip(url, reason)
