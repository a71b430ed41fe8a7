"""Executors sharing a Docker engine sweep only their own objects at start-up, also two run by
mistake with one key (each on its own work_dir): their objects are labelled by key and by
work_dir. What an older version labelled by the key alone is still swept."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import aiodocker

from horde_services.core.config import ExecutorSettings
from horde_services.core.identity import Ed25519Signer
from horde_services.executor.app import executor_instance, start_executor
from horde_services.executor.sandbox import INSTANCE_LABEL, PLACE_LABEL, _labels


async def _container(docker: aiodocker.Docker, job_uuid: str, instance: str) -> str:
    created = await docker.containers.create(
        config={
            "Image": "horde/base:latest",
            "Cmd": ["true"],
            "Labels": _labels(job_uuid, "job", instance),
        }
    )
    return str(created.id)


async def _exists(docker: aiodocker.Docker, container_id: str) -> bool:
    try:
        await docker.containers.get(container_id)
    except aiodocker.DockerError as exc:
        assert exc.status == 404
        return False
    return True


def test_the_labels_are_the_key_and_the_work_dir(tmp_path: Path) -> None:
    key = uuid.uuid4().hex * 2
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    mine = executor_instance(key, tmp_path / "a")
    assert executor_instance(key, tmp_path / "link") == mine  # the same directory
    assert executor_instance(key, tmp_path / "b") != mine
    labels = _labels("j", "job", mine)
    assert labels[INSTANCE_LABEL] == key[:16]  # as an older version labelled them
    assert labels[PLACE_LABEL] == mine.partition("@")[2]


async def test_one_key_on_two_work_dirs_never_sweeps_the_other(
    horde_images: tuple[str, ...],
    docker_client: aiodocker.Docker,
    new_job_uuid: Callable[[], str],
    tmp_path: Path,
) -> None:
    """Executor one runs a job (a container under its labels); executor two starts with the same
    key on another work_dir: its start-up sweep leaves that container alone, and removes the
    one an older version labelled by the key alone."""
    key = Ed25519Signer.generate()  # a fresh key: no other executor's label
    miner = str(Ed25519Signer.generate().identity)

    def settings(work_dir: str) -> ExecutorSettings:
        return ExecutorSettings(
            work_dir=tmp_path / work_dir,
            state_dir=tmp_path / "state",
            miner_address="127.0.0.1:9",  # (no miner: each keeps trying in the background)
            miner_identity=miner,
        )

    one, agent = await start_executor(settings("one"), key)
    try:
        running = await _container(docker_client, new_job_uuid(), agent._runner._runtime.instance)
        legacy = await _container(docker_client, new_job_uuid(), key.identity.public_key.hex()[:16])
        two, _ = await start_executor(settings("two"), key)
        await two.stop(0)
        assert await _exists(docker_client, running)
        assert not await _exists(docker_client, legacy)
    finally:
        await one.stop(0)  # its own sweep at shutdown
    assert not await _exists(docker_client, running)
