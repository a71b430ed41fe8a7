"""ValidatorAdminService: the operator's `horde validator round|weights|spotcheck|evidence`
(thin over the round runner, the scorer and the spot checker). Authentication allows only the
validator's `admins`."""

from __future__ import annotations

import grpc
import structlog
from horde.v1 import validator_admin_pb2, validator_admin_pb2_grpc

from horde_services.core.errors import FailedPrecondition
from horde_services.validator.scoring import Scorer
from horde_services.validator.spotcheck import SpotChecker, SpotCheckReport
from horde_services.validator.synthetic import RoundReport, RoundRunner

log = structlog.get_logger("horde.validator.admin")


def report_to_proto(report: RoundReport) -> validator_admin_pb2.RunRoundResponse:
    return validator_admin_pb2.RunRoundResponse(
        round=report.round,
        duration_s=report.duration_s,
        miners=[
            validator_admin_pb2.MinerRoundResult(
                miner_hotkey=m.miner,
                error=m.error,
                verdicts=[v.to_proto() for v in m.verdicts],
                executor_classes=[v.executor_class for v in m.verdicts],
            )
            for m in report.miners
        ],
    )


def spotcheck_to_proto(report: SpotCheckReport) -> validator_admin_pb2.RunSpotCheckResponse:
    return validator_admin_pb2.RunSpotCheckResponse(
        samples_pulled=report.pulled,
        pull_errors=report.pull_errors,
        checks=[
            validator_admin_pb2.SpotCheckRun(
                check_id=c.check_id,
                kind=c.kind,
                image=c.image,
                image_digest=c.image_digest,
                trusted_job_uuid=c.trusted_job_uuid,
                pairs=len(c.verdicts),
                mismatches=c.mismatches,
                error=c.error,
                duration_s=c.duration_s,
                verdicts=[
                    validator_admin_pb2.SpotCheckVerdict(
                        miner_hotkey=v.miner,
                        job_uuid=v.job_uuid,
                        seq=v.seq,
                        passed=v.passed,
                        comparator=v.comparator,
                        detail=v.detail,
                        evidence_id=v.evidence_id or 0,
                    )
                    for v in c.verdicts
                ],
            )
            for c in report.checks
        ],
    )


class ValidatorAdminServicer(validator_admin_pb2_grpc.ValidatorAdminServiceServicer):
    def __init__(
        self, rounds: RoundRunner, scorer: Scorer, spotcheck: SpotChecker | None = None
    ) -> None:
        self._rounds = rounds
        self._scorer = scorer
        self._spotcheck = spotcheck

    async def RunSpotCheck(
        self, request: validator_admin_pb2.RunSpotCheckRequest, context: grpc.aio.ServicerContext
    ) -> validator_admin_pb2.RunSpotCheckResponse:
        if self._spotcheck is None or not self._spotcheck.configured:
            raise FailedPrecondition(
                "spot checks are not configured: set `trusted_miner` (and `gateways`)"
            )
        report = await self._spotcheck.run(force=True, image_digest=request.image_digest)
        resp = spotcheck_to_proto(report)
        if not self._spotcheck.has_trusted:
            resp.error = "no trusted_miner configured: samples were pulled but not checked"
        log.info(
            "admin_spotcheck",
            pulled=report.pulled,
            checks=len(report.checks),
            mismatches=sum(c.mismatches for c in report.checks),
        )
        return resp

    async def ExportEvidence(
        self, request: validator_admin_pb2.ExportEvidenceRequest, context: grpc.aio.ServicerContext
    ) -> validator_admin_pb2.ExportEvidenceResponse:
        if self._spotcheck is None:
            raise FailedPrecondition("spot checks are not served by this validator")
        records = await self._spotcheck.store.evidence(request.miner_hotkey)
        return validator_admin_pb2.ExportEvidenceResponse(records_json=records)

    async def RunRound(
        self, request: validator_admin_pb2.RunRoundRequest, context: grpc.aio.ServicerContext
    ) -> validator_admin_pb2.RunRoundResponse:
        report = await self._rounds.run_round()
        resp = report_to_proto(report)
        if request.set_weights:
            try:
                resp.weights_reference = (await self._scorer.set_weights()).reference
            except ValueError as exc:
                resp.weights_error = str(exc)
        log.info(
            "admin_round",
            round=report.round,
            executors=report.executors,
            weights=resp.weights_reference or resp.weights_error,
        )
        return resp

    async def GetWeights(
        self, request: validator_admin_pb2.GetWeightsRequest, context: grpc.aio.ServicerContext
    ) -> validator_admin_pb2.GetWeightsResponse:
        scores = await self._scorer.scores()
        last = await self._scorer.last_weights()
        return validator_admin_pb2.GetWeightsResponse(
            miners=[
                validator_admin_pb2.MinerWeight(
                    miner_hotkey=s.miner,
                    ss58=s.ss58,
                    score=s.score,
                    weight=s.weight,
                    reason=s.reason,
                    synthetic_score=s.synthetic,
                    organic_score=s.organic,
                    penalty=s.penalty,
                )
                for s in scores.miners
            ],
            window_s=scores.window_s,
            rounds=scores.rounds,
            last_weights_reference=last.reference if last else "",
            last_weights_ns=last.created_ns if last else 0,
        )
