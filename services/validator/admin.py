"""ValidatorAdminService: the operator's `horde validator round|weights` (thin over the round
runner and the scorer). Authentication allows only the validator's `admins`."""

from __future__ import annotations

import grpc
import structlog
from horde.v1 import validator_admin_pb2, validator_admin_pb2_grpc

from services.validator.scoring import Scorer
from services.validator.synthetic import RoundReport, RoundRunner

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


class ValidatorAdminServicer(validator_admin_pb2_grpc.ValidatorAdminServiceServicer):
    def __init__(self, rounds: RoundRunner, scorer: Scorer) -> None:
        self._rounds = rounds
        self._scorer = scorer

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
