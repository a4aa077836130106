"""Schema-driven fuzzing of the whole API with schemathesis, on both databases: for every
operation of the OpenAPI document, requests that fit it and requests that do not, sent
with an admin key. No answer may be a 5xx, and every answer must be a documented status
whose body matches its schema; a request that breaks the document must be refused. (A
request that fits the document may still be refused with 422: some rules span fields,
such as "a training budget", which a JSON schema cannot say; that check is left out.)

Hypothesis drives each operation directly (schemathesis's pytest plugin does not load
under this pytest). The example count is bounded so that the run fits CI; raise
``FUZZ_EXAMPLES`` for a longer hunt.
"""

from __future__ import annotations

import os

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import Keys, auth

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))


def test_no_5xx_and_every_answer_documented(client: TestClient, keys: Keys) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    headers = auth(keys.admin)
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @hsettings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

            try:
                run()
            except Unsatisfiable:  # nothing to send wrong (an operation without inputs)
                continue
            except (Exception, BaseExceptionGroup) as exc:  # collect, then report them all
                failures.append(f"{op.label} ({mode}): {type(exc).__name__}: {exc}"[:2000])
    print(f"fuzz: {calls} requests")
    assert not failures, "\n\n".join(failures)
    assert calls > 20 * EXAMPLES
