"""Routing: templates, specificity, host binding, 404/405."""

from __future__ import annotations

import pytest

from portcullis.stages.route import RouteConfig, Router, parse_template


def rc(name: str, path: str, methods: list[str], host: str | None = None) -> RouteConfig:
    return RouteConfig(name=name, path=path, methods=methods, upstream="u", host=host, public=True)


ROUTER = Router([
    rc("param", "/v1/projects/{id}", ["GET", "DELETE"]),
    rc("literal", "/v1/projects/new", ["GET"]),
    rc("list", "/v1/projects", ["GET", "POST"]),
    rc("tenant", "/v1/tenants/{tenant}/projects/{id}", ["GET"]),
    rc("hosted", "/v1/projects", ["GET"], host="api.example.com"),
    rc("root", "/", ["GET"]),
])


def name(host: str, method: str, path: str) -> str | list[str]:
    found = ROUTER.resolve(host, method, path)
    return found if isinstance(found, list) else found[0].name


def test_literal_beats_parameter() -> None:
    assert name("x", "GET", "/v1/projects/new") == "literal"
    assert name("x", "GET", "/v1/projects/abc") == "param"


def test_method_falls_through_to_less_specific() -> None:
    assert name("x", "DELETE", "/v1/projects/new") == "param"


def test_405_lists_allowed_methods() -> None:
    assert name("x", "PUT", "/v1/projects/abc") == ["DELETE", "GET", "HEAD"]


def test_404() -> None:
    assert name("x", "GET", "/v2/nothing") == []
    assert name("x", "GET", "/v1/projects/a/b") == []


def test_host_bound_route_wins_for_its_host() -> None:
    assert name("api.example.com", "GET", "/v1/projects") == "hosted"
    assert name("other", "GET", "/v1/projects") == "list"


def test_params_extracted() -> None:
    found = ROUTER.resolve("x", "GET", "/v1/tenants/acme/projects/p1")
    assert not isinstance(found, list)
    assert found[1] == {"tenant": "acme", "id": "p1"}


def test_root_and_head() -> None:
    assert name("x", "GET", "/") == "root"
    assert name("x", "HEAD", "/v1/projects") == "list"


@pytest.mark.parametrize("bad", ["nope", "/a//b", "/a/./b", "/a/../b", "/{x}/{x}", "/{1x}", "/a{b}"])
def test_bad_templates(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_template(bad)


def test_unknown_method_refused_by_model() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        rc("x", "/a", ["FETCH"])
