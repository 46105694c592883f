"""One OPC UA subscription: its monitored items, its keep-alive watchdog and its notifications.

A subscription lives exactly as long as one session; after any loss the driver makes a new one.
It is given the driver's hooks rather than the driver itself, so it knows only what it needs:
how to send a request (failing at once when the connection drops), where samples go, and whom
to tell that the path works or that the server ended it.

Losses a subscription itself notices:

- it went silent (the server stopped publishing or forgot it): no data and no keep-alive for
  `watchdog_factor` keep-alive periods (`drivers.opcua.watchdog`);
- the server ended it (StatusChangeNotification, e.g. BadTimeout, or moved it to another
  session): at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asyncua import Client, ua

from drivers.base import summarize_keys
from drivers.contract import Quality, Sample
from drivers.errors import ConnectionLostError
from drivers.opcua.batching import CREATE_ITEMS, OperationLimits
from drivers.opcua.convert import sample_of, status_name
from drivers.opcua.options import OpcuaOptions
from drivers.opcua.point import OpcuaPoint
from drivers.opcua.watchdog import SubscriptionWatchdog, silence_limit_s

__all__ = ["Item", "Subscription"]

log = logging.getLogger(__name__)

_FILTER_REFUSED = frozenset(
    {
        ua.StatusCodes.BadFilterNotAllowed,
        ua.StatusCodes.BadMonitoredItemFilterUnsupported,
        ua.StatusCodes.BadMonitoredItemFilterInvalid,
        ua.StatusCodes.BadDeadbandFilterInvalid,
    }
)
# Still Good, but the subscription is gone from this session (moved to another one).
_GOOD_TRANSFERRED = ua.StatusCodes.GoodSubscriptionTransferred


@dataclass(slots=True, frozen=True)
class Item:
    """A point with its client handle (its index in the driver's list of items, plus 1)."""

    handle: int
    key: str
    lo: float | None
    hi: float | None
    point: OpcuaPoint


class Subscription:
    """One subscription on one session; `create`, then `add_items`, then `watch`."""

    def __init__(
        self,
        name: str,
        options: OpcuaOptions,
        client: Client,
        items: Sequence[Item],
        nodeids: Mapping[str, ua.NodeId],
        *,
        limits: OperationLimits,
        call: Callable[[Awaitable[Any]], Awaitable[Any]],
        deliver: Callable[[list[Sample]], None],
        alive: Callable[[], None],
        ended: Callable[[BaseException], None],
    ) -> None:
        self.name = name
        self.options = options
        self._client = client
        self._items = items
        self._nodeids = nodeids
        self._limits = limits
        self._call = call
        self._deliver = deliver
        self._alive = alive
        self._ended = ended
        self.sub_id: int | None = None
        self._revised: tuple[float, int] = (options.publishing_interval_ms, options.keepalive_count)
        self._watchdog: SubscriptionWatchdog | None = None
        self._heard = False

    async def create(self) -> None:
        """Create the subscription on the server; notifications start arriving at `on_publish`."""
        opts = self.options
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=opts.publishing_interval_ms,
            RequestedLifetimeCount=opts.lifetime_count,
            RequestedMaxKeepAliveCount=opts.keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        result = await self._call(
            self._client.uaclient.create_subscription(params, self.on_publish)
        )
        self.sub_id = result.SubscriptionId
        self._revised = (
            result.RevisedPublishingInterval or opts.publishing_interval_ms,
            result.RevisedMaxKeepAliveCount or opts.keepalive_count,
        )

    async def add_items(self) -> list[Sample]:
        """Create the monitored items, then start the watchdog; return BAD samples for refusals."""
        assert self.sub_id is not None, "create() first"
        failed = await self._create_items(self.sub_id)
        interval, keepalive = self._revised
        limit = silence_limit_s(interval, keepalive, self.options.watchdog_factor)
        self._watchdog = SubscriptionWatchdog(limit, asyncio.get_running_loop().time())
        log.info(
            "%s: subscribed to %d items (publishing %g ms, keep-alive %d, silent after %.1f s)",
            self.name,
            len(self._nodeids) - len(failed),
            interval,
            keepalive,
            limit,
        )
        return failed

    async def watch(self, sleep_unless_lost: Callable[[float], Awaitable[None]]) -> None:
        """Raise ConnectionLostError once the subscription went silent; never return otherwise.

        `sleep_unless_lost(delay)` waits, and raises at once if the connection drops meanwhile.
        """
        watchdog = self._watchdog
        assert watchdog is not None, "add_items() first"
        loop = asyncio.get_running_loop()
        while True:
            await sleep_unless_lost(watchdog.remaining(loop.time()))
            silence = watchdog.silent_for(loop.time())
            if silence is not None:
                raise ConnectionLostError(
                    f"{self.name}: subscription silent for {silence:.1f} s (no data, no "
                    f"keep-alive; limit {watchdog.limit_s:.1f} s)"
                )

    def close(self) -> None:
        """Ignore whatever the old session still publishes."""
        self.sub_id = None

    def on_publish(self, result: ua.PublishResult) -> None:
        """Turn one publish response into samples; called by asyncua's publish loop."""
        if self.sub_id is None or result.SubscriptionId != self.sub_id:
            return
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.heard(asyncio.get_running_loop().time())
        if not self._heard:
            # The whole path works (session, subscription, publish): reconnect fast next time.
            self._heard = True
            self._alive()
        data = result.NotificationMessage.NotificationData
        if not data:
            return  # a keep-alive
        items = self._items
        count = len(items)
        samples: list[Sample] = []
        append = samples.append
        for notification in data:
            if type(notification) is ua.DataChangeNotification:
                for mi in notification.MonitoredItems:
                    handle = mi.ClientHandle
                    if 0 < handle <= count:
                        item = items[handle - 1]
                        append(sample_of(item.key, mi.Value, item.lo, item.hi))
            elif isinstance(notification, ua.StatusChangeNotification):
                self._status_changed(notification.Status)
        if samples:
            self._deliver(samples)

    # -- helpers ----------------------------------------------------------------------------------

    async def _create_items(self, sub_id: int) -> list[Sample]:
        """Create the monitored items in batches; return BAD samples for those refused."""
        requests = self._requests()

        async def create(batch: list[ua.MonitoredItemCreateRequest]) -> list[Any]:
            create_params = ua.CreateMonitoredItemsParameters(
                SubscriptionId=sub_id,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=batch,
            )
            return await self._call(self._client.uaclient.create_monitored_items(create_params))

        results = await self._limits.send(CREATE_ITEMS, [r for _, r in requests], create)
        outcome = list(zip(requests, results, strict=True))
        # A deadband on a node that is not numeric (a bool, a string) or a server without
        # DataChangeFilter support: subscribe without the filter; the twin applies the
        # deadband again at ingest anyway.
        unfiltered = [
            (item, request)
            for (item, request), res in outcome
            if res.StatusCode.value in _FILTER_REFUSED
            and isinstance(request.RequestedParameters.Filter, ua.DataChangeFilter)
        ]
        if unfiltered:
            for _, request in unfiltered:
                request.RequestedParameters.Filter = ua.ExtensionObject()  # no filter
            log.info(
                "%s: deadband filter refused for %s; subscribed without it",
                self.name,
                summarize_keys([item.key for item, _ in unfiltered]),
            )
            retried = await self._limits.send(CREATE_ITEMS, [r for _, r in unfiltered], create)
            outcome = [
                (pair, res)
                for pair, res in outcome
                if not any(pair[0] is item for item, _ in unfiltered)
            ] + list(zip(unfiltered, retried, strict=True))
        failed: list[Sample] = []
        now = time.time()
        for (item, _), res in outcome:
            code = res.StatusCode.value
            if code & 0x80000000:
                failed.append(Sample(item.key, None, Quality.BAD, now, status_name(code)))
        if failed:
            log.warning(
                "%s: the server refused %d monitored items: %s",
                self.name,
                len(failed),
                summarize_keys([f"{s.key} ({s.reason})" for s in failed]),
            )
        return failed

    def _requests(self) -> list[tuple[Item, ua.MonitoredItemCreateRequest]]:
        """One create request per resolved point, with its sampling, queue and deadband."""
        opts = self.options
        default_interval = (
            -1.0 if opts.sampling_interval_ms is None else float(opts.sampling_interval_ms)
        )
        requests: list[tuple[Item, ua.MonitoredItemCreateRequest]] = []
        for item in self._items:
            nodeid = self._nodeids.get(item.key)
            if nodeid is None:
                continue
            p = item.point
            interval = (
                default_interval if p.sampling_interval_ms is None else p.sampling_interval_ms
            )
            deadband = opts.deadband if p.deadband is None else p.deadband
            mparams = ua.MonitoringParameters(
                ClientHandle=item.handle,
                SamplingInterval=interval,
                QueueSize=opts.queue_size if p.queue_size is None else p.queue_size,
                DiscardOldest=True,
            )
            if deadband:
                mparams.Filter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValue,
                    DeadbandType=ua.DeadbandType.Absolute,
                    DeadbandValue=float(deadband),
                )
            request = ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=nodeid, AttributeId=ua.AttributeIds.Value),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=mparams,
            )
            requests.append((item, request))
        return requests

    def _status_changed(self, status: ua.StatusCode) -> None:
        code = status.value
        if code & 0x80000000 or code == _GOOD_TRANSFERRED:
            self._ended(
                ConnectionLostError(
                    f"{self.name}: the server ended the subscription: {status_name(code)}"
                )
            )
