"""Prometheus metrics of the provisioning server (`/metrics`), in the style of Airlock and the update server.

`/metrics` needs no token, as on the update server: it shows counts only, never a label, a config
or a template. It is a read-side endpoint, so `--allow` limits who may scrape it (403 otherwise).
Counters count what this process answered since it started (sum them over copies behind a
balancer); the `config_*` gauges are read from the data folder at scrape time (the same on every
copy: take `max`). Names (anchors-2026.md §5: Airlock's `airlock_config_groups`,
`airlock_v1_pre_reboot_incoming_requests_total`):

- `obelisk_provision_requests_total{endpoint,result}`   counter: read-side answers; endpoint is the route
  (`ipxe`, `grub`, `cloud`, `ignition`, `generic`, `metadata`, `boot.ipxe`, `assets`, `index`), result is
  `served`, `not_found` (404), `bad_request` (400), `refused` (403: not in --allow) or `error` (500)
- `obelisk_provision_configs_rendered_total{kind}`      counter: what was rendered for a host: `ipxe` and
  `grub` scripts, `metadata`, and templates by their kind (`cloud`, `ignition`, `generic`)
- `obelisk_provision_render_errors_total{endpoint}`     counter: renders that failed (a template that fails
  on the group's data, a label the template needs and the request lacks, a config that does not validate)
- `obelisk_provision_write_requests_total{result}`      counter: write-API requests: `ok`, `unauthorized`
  (401), `refused` (403: the API is off here), `rejected` (other 4xx) or `error` (5xx)
- `obelisk_provision_write_changes_total{kind,change}`  counter: `profiles`, `groups` or a template kind,
  `created`, `updated` or `deleted`
- `obelisk_provision_config_groups` / `_profiles`       gauge: files in the data folder
- `obelisk_provision_config_templates{kind}`            gauge: templates per kind
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from provision.model import TEMPLATE_KINDS
from provision.store import Store

ENDPOINTS = ("index", "boot.ipxe", "ipxe", "grub", "cloud", "ignition", "generic", "metadata", "assets")
READ_RESULTS = {400: "bad_request", 403: "refused", 404: "not_found"}
WRITE_RESULTS = {401: "unauthorized", 403: "refused"}
RENDERED = ("ipxe", "grub", "metadata", *TEMPLATE_KINDS)


def read_result(status: int) -> str:
    if status >= 500:
        return "error"
    return READ_RESULTS.get(status, "served" if status < 400 else "bad_request")


def write_result(status: int) -> str:
    if status >= 500:
        return "error"
    return WRITE_RESULTS.get(status, "ok" if status < 400 else "rejected")


class _DataCollector(Collector):
    """What the data folder holds, counted at scrape time (names only: no file is parsed)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("obelisk_provision_config_groups", "Groups (host selectors) in the data folder",
                                value=len(self.store.ids("groups")))
        yield GaugeMetricFamily("obelisk_provision_config_profiles", "Profiles in the data folder",
                                value=len(self.store.ids("profiles")))
        templates = GaugeMetricFamily("obelisk_provision_config_templates", "Templates in the data folder, per kind",
                                      labels=["kind"])
        for kind in TEMPLATE_KINDS:
            templates.add_metric([kind], len(self.store.ids(kind)))
        yield templates


class ProvisionMetrics:
    """The registry behind `/metrics`; the read side and the write API report to it."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("obelisk_provision_requests", "Read-side requests answered, per endpoint and result",
                                ["endpoint", "result"], registry=r)
        self.rendered = Counter("obelisk_provision_configs_rendered", "Scripts, metadata and templates rendered",
                                ["kind"], registry=r)
        self.render_errors = Counter("obelisk_provision_render_errors", "Renders that failed, per endpoint",
                                     ["endpoint"], registry=r)
        self.write_requests = Counter("obelisk_provision_write_requests", "Write-API requests, per result",
                                      ["result"], registry=r)
        self.write_changes = Counter("obelisk_provision_write_changes", "Changes made through the write API",
                                     ["kind", "change"], registry=r)
        # Every series exists from the start (at 0), so rate() and alerts see the first event too.
        for e in ENDPOINTS:
            for res in ("served", "not_found", "bad_request", "refused", "error"):
                self.requests.labels(e, res)
            self.render_errors.labels(e)
        for k in RENDERED:
            self.rendered.labels(k)
        for res in ("ok", "unauthorized", "refused", "rejected", "error"):
            self.write_requests.labels(res)
        r.register(_DataCollector(store))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, read_result(status)).inc()

    def write(self, status: int) -> None:
        self.write_requests.labels(write_result(status)).inc()

    def change(self, kind: str, change: str) -> None:
        self.write_changes.labels(kind, change).inc()

    async def endpoint(self) -> Response:
        body = await run_in_threadpool(generate_latest, self.registry)  # the gauges list the data folder
        return Response(body, media_type=CONTENT_TYPE_LATEST)
