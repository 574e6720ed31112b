"""Delivery providers: e-mail over SMTP, SMS over an HTTP JSON API, push over an FCM-v1-like API.

Each provider keeps a token-bucket rate limit and a circuit breaker, retries transient errors
(5xx, 429, timeouts, connection failures) a few times with exponential backoff and full jitter,
and never retries permanent ones (other 4xx). What is still failing is handed back as
`transient` or `unavailable` so the dispatcher parks the message for later.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, parseaddr
from typing import Any, Literal

import aiohttp
import aiosmtplib
import orjson

# Long unsubscribe URLs must stay one header line (RFC 5322 allows 998); the default folding at
# 78 would encode them as RFC 2047 words, which mail clients do not parse as a List-Unsubscribe URL.
MAIL_POLICY = SMTP.clone(max_line_length=998)

Outcome = Literal["ok", "transient", "permanent", "unavailable"]


@dataclass(slots=True)
class Outbound:
    """One rendered message ready for a provider."""

    message_id: str
    customer_id: str
    channel: str
    to: str
    subject: str | None
    body: str
    html: str | None = None
    unsubscribe_url: str | None = None


@dataclass(slots=True)
class SendResult:
    outcome: Outcome
    status_code: int | None = None
    provider_message_id: str | None = None
    error: str | None = None
    tries: int = 0
    cost: Decimal | None = None
    duration_ms: int = 0


class TransientError(Exception):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PermanentError(Exception):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RateLimiter:
    """Token bucket: at most `rate` sends per second with a burst of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.last = time.monotonic()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class Breaker:
    """Open after `threshold` transient failures in a row; probe again after the cooldown."""

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until = 0.0

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half_open"

    def allow(self) -> bool:
        return self.state != "open"

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s


@dataclass
class ProviderStats:
    sent: int = 0
    permanent_failures: int = 0
    transient_failures: int = 0
    parked: int = 0
    last_error: str | None = None
    last_success_at: float | None = None
    last_failure_at: float | None = None


@dataclass
class RetryPolicy:
    retries: int = 2
    base_s: float = 0.2
    max_s: float = 2.0

    def delay(self, attempt: int) -> float:
        # Full jitter (AWS architecture blog): spreads retries of many senders over the window.
        return random.uniform(0, min(self.max_s, self.base_s * 2**attempt))


class Provider:
    """Base: rate limit, breaker, retries; subclasses implement one call in `_send_once`."""

    name = "provider"
    channel = "email"

    def __init__(self, *, rate_per_s: float, timeout_s: float, retry: RetryPolicy, breaker: Breaker) -> None:
        self.limiter = RateLimiter(rate_per_s)
        self.timeout_s = timeout_s
        self.retry = retry
        self.breaker = breaker
        self.stats = ProviderStats()

    async def _send_once(self, out: Outbound) -> tuple[str | None, Decimal | None]:
        raise NotImplementedError

    async def send(self, out: Outbound) -> SendResult:
        """Send with retries; never raises for provider trouble, the outcome says what happened."""
        started = time.perf_counter()
        if not self.breaker.allow():
            self.stats.parked += 1
            return SendResult("unavailable", error="provider circuit open", duration_ms=0)
        tries = 0
        last: TransientError | None = None
        while True:
            tries += 1
            await self.limiter.acquire()
            try:
                # A timeout scope, not wait_for: no extra task per send (3.11's wait_for makes one).
                async with asyncio.timeout(self.timeout_s):
                    pid, cost = await self._send_once(out)
            except PermanentError as exc:
                # The provider answered: it is up, the message is what it refuses.
                self.breaker.success()
                self.stats.permanent_failures += 1
                self.stats.last_error = str(exc)[:500]
                return SendResult(
                    "permanent",
                    exc.status_code,
                    None,
                    str(exc)[:1000],
                    tries,
                    duration_ms=_ms(started),
                )
            except (
                TransientError,
                TimeoutError,
                aiohttp.ClientError,
                aiosmtplib.SMTPException,
                OSError,
            ) as exc:
                last = exc if isinstance(exc, TransientError) else TransientError(f"{type(exc).__name__}: {exc}")
                self.breaker.failure()
                self.stats.transient_failures += 1
                self.stats.last_error = str(last)[:500]
                self.stats.last_failure_at = time.time()
                if tries > self.retry.retries or not self.breaker.allow():
                    self.stats.parked += 1
                    return SendResult(
                        "transient",
                        last.status_code,
                        None,
                        str(last)[:1000],
                        tries,
                        duration_ms=_ms(started),
                    )
                await asyncio.sleep(self.retry.delay(tries - 1))
                continue
            self.breaker.success()
            self.stats.sent += 1
            self.stats.last_success_at = time.time()
            return SendResult("ok", 200, pid, None, tries, cost, duration_ms=_ms(started))

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "name": self.name,
            "channel": self.channel,
            "state": "down"
            if self.breaker.state == "open"
            else ("probing" if self.breaker.state == "half_open" else "up"),
            "breaker": self.breaker.state,
            "consecutive_failures": self.breaker.failures,
            "rate_limit_per_s": self.limiter.rate,
            "sent": s.sent,
            "permanent_failures": s.permanent_failures,
            "transient_failures": s.transient_failures,
            "parked": s.parked,
            "last_error": s.last_error,
            "last_success_at": s.last_success_at,
            "last_failure_at": s.last_failure_at,
        }

    async def aclose(self) -> None:
        return None


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


@dataclass(slots=True)
class HttpAnswer:
    """A provider's HTTP answer, read in full."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class HttpClient:
    """One pooled aiohttp session shared by the HTTP providers.

    aiohttp costs about a tenth of httpx's CPU per request here (loopback, keep-alive). The
    session needs a running event loop, so it is opened on the first request. Only connecting has
    a deadline of its own; the whole call is bounded by the provider's timeout around it.
    """

    def __init__(self, *, connections: int, connect_timeout_s: float) -> None:
        self.connections = connections
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=self.timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> HttpAnswer:
        async with self._open().post(url, data=content, headers=headers) as response:
            return HttpAnswer(response.status, await response.read())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def classify_http(response: HttpAnswer) -> None:
    """Raise for a non-2xx answer: 5xx, 408 and 429 are transient, other 4xx permanent."""
    code = response.status_code
    if code < 300:
        return
    detail = response.text[:300]
    if code >= 500 or code in (408, 425, 429):
        raise TransientError(f"HTTP {code}: {detail}", code)
    raise PermanentError(f"HTTP {code}: {detail}", code)


def _json(response: HttpAnswer) -> dict[str, Any]:
    try:
        data = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


GSM_SINGLE = 160
GSM_PART = 153
UCS_SINGLE = 70
UCS_PART = 67
# Printable ASCII and line breaks: what is sent as GSM-7 here.
_GSM_TEXT = re.compile(r"[ -~\n\r]*")


def sms_segments(text: str) -> int:
    """How many SMS parts a text needs (GSM-7 for plain ASCII, UCS-2 otherwise)."""
    gsm = _GSM_TEXT.fullmatch(text) is not None
    single, part = (GSM_SINGLE, GSM_PART) if gsm else (UCS_SINGLE, UCS_PART)
    n = len(text)
    return 1 if n <= single else -(-n // part)


class SmsProvider(Provider):
    name = "sms"
    channel = "sms"

    def __init__(
        self,
        *,
        client: HttpClient,
        url: str,
        api_key: str,
        sender: str,
        cost_per_message: Decimal,
        callback_url: str | None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.client = client
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.sender = sender
        self.cost_per_message = cost_per_message
        self.callback_url = callback_url

    async def _send_once(self, out: Outbound) -> tuple[str | None, Decimal | None]:
        payload = {"to": out.to, "from": self.sender, "text": out.body, "reference": out.message_id}
        if self.callback_url:
            payload["callback_url"] = self.callback_url
        response = await self.client.post(
            self.url,
            content=orjson.dumps(payload),
            headers={**self.headers, "Idempotency-Key": out.message_id},
        )
        classify_http(response)
        data = _json(response)
        pid = data.get("id") or data.get("message_id")
        return (str(pid) if pid is not None else None), self.cost_per_message * sms_segments(out.body)


class PushProvider(Provider):
    name = "push"
    channel = "push"

    def __init__(
        self,
        *,
        client: HttpClient,
        base_url: str,
        project_id: str,
        access_token: str,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.client = client
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.headers = {
            "Authorization": f"Bearer {access_token}",
            "Content-Type": "application/json",
        }

    async def _send_once(self, out: Outbound) -> tuple[str | None, Decimal | None]:
        payload = {
            "message": {
                "token": out.to,
                "notification": {"title": out.subject or "", "body": out.body},
                "data": {"message_id": out.message_id, "customer_id": out.customer_id},
            }
        }
        response = await self.client.post(self.url, content=orjson.dumps(payload), headers=self.headers)
        classify_http(response)
        name = _json(response).get("name")
        return (str(name) if name else None), None


class EmailProvider(Provider):
    name = "email"
    channel = "email"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        username: str | None,
        password: str | None,
        start_tls: bool,
        use_tls: bool,
        unsubscribe_mailto: str | None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.host = host
        self.port = port
        self.sender = sender
        self.username = username
        self.password = password
        self.start_tls = start_tls
        self.use_tls = use_tls
        self.unsubscribe_mailto = unsubscribe_mailto
        domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
        self.domain = domain
        self.envelope_from = parseaddr(sender)[1] or sender

    def build(self, out: Outbound) -> EmailMessage:
        """The MIME message: text, optional HTML, one-click unsubscribe (RFC 2369, RFC 8058)."""
        msg = EmailMessage(policy=MAIL_POLICY)
        msg["From"] = self.sender
        msg["To"] = formataddr(("", out.to))
        msg["Subject"] = out.subject or ""
        safe_id = "".join(c if c.isalnum() or c in "-_." else "-" for c in out.message_id)[:200]
        msg["Message-ID"] = f"<{safe_id}@{self.domain}>"
        msg["X-CRM-Message-Id"] = safe_id
        if out.unsubscribe_url:
            targets = [f"<{out.unsubscribe_url}>"]
            if self.unsubscribe_mailto:
                targets.append(f"<mailto:{self.unsubscribe_mailto}?subject=unsubscribe>")
            msg["List-Unsubscribe"] = ", ".join(targets)
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(out.body)
        if out.html:
            msg.add_alternative(out.html, subtype="html")
        return msg

    async def _send_once(self, out: Outbound) -> tuple[str | None, Decimal | None]:
        msg = self.build(out)
        try:
            # Flattened here, not by aiosmtplib, so our header policy (no folding of the URL) holds.
            await aiosmtplib.send(
                msg.as_bytes(policy=MAIL_POLICY),
                sender=self.envelope_from,
                recipients=[out.to],
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                start_tls=self.start_tls,
                use_tls=self.use_tls,
                timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if any(400 <= c < 500 for c in codes):
                raise TransientError(f"recipient refused: {exc}", codes[0]) from None
            raise PermanentError(f"recipient refused: {exc}", codes[0] if codes else None) from None
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise TransientError(f"SMTP {exc.code}: {exc.message}", exc.code) from None
            raise PermanentError(f"SMTP {exc.code}: {exc.message}", exc.code) from None
        return msg["Message-ID"], None


@dataclass
class Providers:
    """The providers of one process, by channel."""

    by_channel: dict[str, Provider] = field(default_factory=dict)
    client: HttpClient | None = None

    def get(self, channel: str) -> Provider:
        return self.by_channel[channel]

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in self.by_channel.values()]

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def build_providers(settings: Any) -> Providers:
    """Make the three providers from settings, sharing one pooled HTTP client."""
    s = settings
    client = HttpClient(
        connections=max(10, s.dispatch_concurrency),
        connect_timeout_s=3.0,
    )
    retry = RetryPolicy(s.send_retries, s.send_retry_base_s, s.send_retry_max_s)

    def common(rate: float, timeout: float) -> dict[str, Any]:
        return {
            "rate_per_s": rate,
            "timeout_s": timeout,
            "retry": retry,
            "breaker": Breaker(s.breaker_threshold, s.breaker_cooldown_s),
        }

    base = s.public_base_url.rstrip("/")
    return Providers(
        by_channel={
            "email": EmailProvider(
                host=s.smtp_host,
                port=s.smtp_port,
                sender=s.email_from,
                username=s.smtp_username,
                password=s.smtp_password,
                start_tls=s.smtp_start_tls,
                use_tls=s.smtp_use_tls,
                unsubscribe_mailto=s.email_unsubscribe_mailto,
                **common(s.email_rate_per_s, s.smtp_timeout_s),
            ),
            "sms": SmsProvider(
                client=client,
                url=s.sms_url,
                api_key=s.sms_api_key,
                sender=s.sms_sender,
                cost_per_message=s.sms_cost_per_message,
                callback_url=f"{base}/v1/providers/sms/callbacks",
                **common(s.sms_rate_per_s, s.sms_timeout_s),
            ),
            "push": PushProvider(
                client=client,
                base_url=s.push_base_url,
                project_id=s.push_project_id,
                access_token=s.push_access_token,
                **common(s.push_rate_per_s, s.push_timeout_s),
            ),
        },
        client=client,
    )
