"""schemathesis against the real write API: the OpenAPI description is fetched from the running
server (GET /api/v1/openapi.json, sent with the bearer token), and for every operation in it
schemathesis generates requests, positive (valid per the schema) and negative (invalid per the
schema), EXAMPLES of each, sent over loopback to the server authenticated by its bearer token
(schemathesis drops or garbles the token in some negative cases, which must then be refused).
Every response goes through all of schemathesis's checks:

- not_a_server_error: never a 5xx;
- status_code_conformance, content_type_conformance, response_headers_conformance,
  response_schema_conformance: every status, content type and body is one the description declares;
- negative_data_rejection: schema-invalid requests are refused with a 4xx;
- positive_data_acceptance: schema-valid requests are accepted (2xx), or refused only for what a
  schema cannot say: 404 (no such thing), 409 (a reference to a missing profile or template);
- missing_required_header, ignored_auth, unsupported_method and the other stateless checks.

Two checks are off where they cannot hold: negative_data_rejection for GET /select (every query is
a label set; malformed labels are dropped and reported, as matchbox does, so nothing is invalid),
and positive_data_acceptance for PUT of a template (any string is schema-valid, but jinja may refuse
it with a 422). A few fixed cases also GET, then PUT back, the example data's real objects, so the
schemas of 200 answers are checked on more than what the fuzzer happens to create. Generation is
derandomized, so a failure reproduces; afterwards every file in the data folder must still load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prov_helpers import AUTH, TOKEN, Served, serving_rw
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from provision.store import Store

EXAMPLES = 30  # per operation and mode: 13 operations x 2 modes x 30, about 20 s on loopback

CONFIG = {
    # the description's security scheme is named "bearer"
    "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
    "request-timeout": 10,
    "operations": [
        {"include-operation-id": "select", "checks": {"negative_data_rejection": {"enabled": False}}},
        {"include-operation-id": "put_template", "checks": {"positive_data_acceptance": {"enabled": False}}},
    ],
}


def _fuzz(op: schemathesis.APIOperation, mode: GenerationMode) -> int:
    """Run EXAMPLES generated cases of one operation through all checks; how many ran."""
    ran = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal ran
        ran += 1
        case.call_and_validate()

    run()
    return ran


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    with serving_rw(tmp_path) as sd:
        yield sd


def test_schemathesis_finds_no_server_error_or_schema_violation(served: tuple[Served, Path]) -> None:
    s, data = served
    schema = schemathesis.openapi.from_url(s.url + "/api/v1/openapi.json", headers=AUTH,
                                           config=SchemathesisConfig.from_dict(CONFIG))
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 13, [op.label for op in operations]
    counts: dict[str, int] = {}
    failures: list[str] = []

    # Fixed cases on the example data's real objects, and a round trip: what GET gives, PUT takes.
    # (Explicit cases do not get the configured auth; they are positive, so they send the token.)
    fixed = [schema["/api/v1/profiles/{id}"]["GET"].Case(path_parameters={"id": "tiny"}),
             schema["/api/v1/groups/{id}"]["GET"].Case(path_parameters={"id": "node1"}),
             schema["/api/v1/templates/{kind}/{name}"]["GET"].Case(path_parameters={"kind": "cloud",
                                                                                  "name": "node.yaml"}),
             schema["/api/v1/templates/{kind}"]["GET"].Case(path_parameters={"kind": "generic"}),
             schema["/api/v1/profiles"]["GET"].Case(),
             schema["/api/v1/groups"]["GET"].Case()]
    for plural, ident in (("profiles", "tiny"), ("groups", "node1")):
        current = s.get(f"/api/v1/{plural}/{ident}", headers=AUTH).json()
        del current["id"]  # the body schema leaves the id to the path
        fixed.append(schema[f"/api/v1/{plural}/{{id}}"]["PUT"].Case(path_parameters={"id": ident}, body=current))
    for case in fixed:
        response = case.call_and_validate(headers=AUTH)
        assert response.status_code == 200, (case.operation.label, response.text)
    # the labels object is exploded into the query (style form): ?mac=...
    select = schema["/api/v1/select"]["GET"].Case(query={"mac": "52-54-00-12-34-56"})
    assert select.call_and_validate(headers=AUTH).json()["group"] == "node1"
    counts["fixed cases"] = len(fixed) + 1

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{op.label} ({mode.value})"
            try:
                counts[label] = _fuzz(op, mode)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - one report for every operation
                failures.append(f"{label}:\n{exc}")

    total = sum(counts.values())
    print(f"\nschemathesis: {total} requests, {len(operations)} operations; per operation and mode:")
    for label, n in counts.items():
        print(f"  {n:4d}  {label}")
    assert not failures, "\n\n".join(failures)
    assert total >= len(operations) * 2 * 5  # generation really ran (some operations have few distinct inputs)

    log = s.log_text()
    assert "Traceback" not in log, log[-4000:]
    # whatever the fuzzer wrote left a data folder the server (and `obelisk provision check`) can load
    store = Store(data)
    for ident in store.ids("profiles"):
        store.profile(ident)
    store.groups()
    for kind in ("cloud", "generic"):
        for name in store.ids(kind):
            store.template(kind, name)
    assert not [p for p in data.rglob(".*") if p.name != ".lock"]
