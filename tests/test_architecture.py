"""The package layering: schemas <- streams <- agents | edge <- tickwave (the CLI).

Read from the code itself with grimp (every import, function-level ones included),
so a back-arrow such as edge importing the launcher's settings fails here.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("schemas", "streams", "agents", "edge", "tickwave")
# importer -> what it may import; anything else between two packages is a violation
ALLOWED = {
    "schemas": set(),
    "streams": {"schemas"},
    "agents": {"schemas", "streams"},
    "edge": {"schemas", "streams"},
    "tickwave": {"schemas", "streams", "agents", "edge"},
}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


def _violations(graph: grimp.ImportGraph) -> list[str]:
    found = []
    for importer in PACKAGES:
        for imported in PACKAGES:
            if importer == imported or imported in ALLOWED[importer]:
                continue
            if graph.direct_import_exists(importer=importer, imported=imported, as_packages=True):
                details = graph.find_import_details(importer=importer, imported=imported) or [
                    {"importer": m, "line_contents": f"imports {imported}"}
                    for m in graph.find_modules_that_directly_import(imported)
                    if m.split(".")[0] == importer
                ]
                found += [f"{d['importer']}: {d['line_contents']}" for d in details] or [f"{importer} -> {imported}"]
    return found


def test_imports_point_one_way(graph):
    assert _violations(graph) == []


def test_edge_and_agents_are_independent(graph):
    assert not graph.chain_exists(importer="edge", imported="agents", as_packages=True)
    assert not graph.chain_exists(importer="agents", imported="edge", as_packages=True)


def test_no_cycle_between_packages(graph):
    for a in PACKAGES:
        for b in PACKAGES:
            if a < b:
                both = (graph.chain_exists(importer=a, imported=b, as_packages=True)
                        and graph.chain_exists(importer=b, imported=a, as_packages=True))
                assert not both, f"{a} and {b} import each other"


def test_the_client_sdk_depends_on_schemas_alone(graph):
    """tickwave.client is what apps install: no streams, agents, edge or CLI behind it."""
    reached = graph.find_upstream_modules("tickwave.client")
    assert {m.split(".")[0] for m in reached} <= {"schemas"}, sorted(m for m in reached if not m.startswith("schemas"))
