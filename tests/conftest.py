from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import dbs

ALL_DIALECTS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]


@pytest.fixture(params=ALL_DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A throwaway database of each kind (parametrised)."""
    with dbs.database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with dbs.pg_database() as url:
        yield url


@pytest.fixture
def mysql_url() -> Iterator[str]:
    with dbs.mysql_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with dbs.sqlite_database(tmp_path) as url:
        yield url


@pytest.fixture
def pg_canary_url() -> Iterator[str]:
    with dbs.pg_database(canary=True) as url:
        yield url


@pytest.fixture
def mysql_canary_url() -> Iterator[str]:
    with dbs.mysql_database(canary=True) as url:
        yield url
