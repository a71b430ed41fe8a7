"""Fixtures for the executor tests: Docker availability, Horde's job images, a runtime that checks
it leaves nothing behind."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiodocker
import pytest
from docker_images import ensure_images

from horde_services.executor.sandbox import JOB_LABEL, DockerRuntime

REQUIRED_IMAGES = ("horde/base:latest", "horde/demo-job:latest")


@pytest.fixture(scope="session")
def horde_images() -> tuple[str, ...]:
    """Make sure Horde's job images exist, building them with deploy/images/build.sh if not.

    Fails (never skips) when Docker is unavailable: these tests are the sandbox's proof.
    """
    ensure_images(REQUIRED_IMAGES)
    return REQUIRED_IMAGES


async def horde_objects(docker: aiodocker.Docker, job_uuids: list[str]) -> list[str]:
    """Every container, volume and network labelled with one of these job uuids."""
    found: list[str] = []
    for job_uuid in job_uuids:
        label = f"{JOB_LABEL}={job_uuid}"
        filters = json.dumps({"label": [label]})
        containers = await docker._query_json(
            "containers/json", params={"all": "true", "filters": filters}
        )
        found += [f"container {c['Names']}" for c in containers]
        volumes = await docker._query_json("volumes", params={"filters": filters})
        found += [f"volume {v['Name']}" for v in volumes.get("Volumes") or []]
        networks = await docker._query_json("networks", params={"filters": filters})
        found += [f"network {n['Name']}" for n in networks]
    return found


LeftoverFinder = Callable[[list[str]], Awaitable[list[str]]]


@pytest.fixture
def find_leftovers(docker_client: aiodocker.Docker) -> LeftoverFinder:
    """``await find_leftovers([uuid, ...])``: Horde objects still labelled with those jobs."""

    async def find(job_uuids: list[str]) -> list[str]:
        return await horde_objects(docker_client, job_uuids)

    return find


@pytest.fixture
def job_uuids() -> list[str]:
    return []


@pytest.fixture
def new_job_uuid(job_uuids: list[str]) -> Callable[[], str]:
    """Fresh job uuids, remembered so teardown can check nothing labelled with them remains."""

    def make() -> str:
        value = str(uuid.uuid4())
        job_uuids.append(value)
        return value

    return make


@pytest.fixture
async def docker_client() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def runtime(
    horde_images: tuple[str, ...], docker_client: aiodocker.Docker, job_uuids: list[str]
) -> AsyncIterator[DockerRuntime]:
    # A private instance: a concurrent executor or test run sweeping its own leftovers on the
    # same engine must not remove this test's containers (nor this test theirs).
    rt = DockerRuntime(docker_client, instance=f"test-{uuid.uuid4().hex[:12]}")
    try:
        yield rt
    finally:
        await rt.close()
        leftovers = await horde_objects(docker_client, job_uuids)
        assert leftovers == [], f"sandbox left objects behind: {leftovers}"
