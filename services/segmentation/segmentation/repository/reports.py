"""Reports over all profiles: revenue concentration, the RFM grid, acquisition channels."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from segmentation import models

_stat = models.FeatureStat


class ReportRepository:
    """Population reports over profiles (read-only)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def pareto(self) -> dict[str, Any]:
        row = (
            (
                await self.session.execute(
                    text(
                        "WITH r AS (SELECT revenue, row_number() OVER (ORDER BY revenue DESC, customer_id) AS rk, count(*) OVER () AS n,"
                        " sum(revenue) OVER () AS total FROM profiles WHERE orders > 0) "
                        "SELECT max(n) AS customers, max(total) AS revenue,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.01)) AS top1,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.05)) AS top5,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.10)) AS top10,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.20)) AS top20,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.50)) AS top50 FROM r"
                    )
                )
            )
            .mappings()
            .one()
        )
        total = row["revenue"] or Decimal(0)
        shares = []
        for pct, col in (
            (1, "top1"),
            (5, "top5"),
            (10, "top10"),
            (20, "top20"),
            (50, "top50"),
            (100, None),
        ):
            part = total if col is None else (row[col] or Decimal(0))
            shares.append(
                {
                    "top_percent": pct,
                    "revenue": part,
                    "share": float(part / total) if total else 0.0,
                }
            )
        return {"customers": int(row["customers"] or 0), "revenue": total, "shares": shares}

    async def rfm_grid(self) -> dict[str, Any]:
        cells = await self.session.execute(
            text(
                "SELECT rfm_r AS r, rfm_f AS f, count(*) AS customers, sum(revenue) AS revenue FROM profiles "
                "WHERE rfm_r IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"
            )
        )
        groups = await self.session.execute(
            text(
                "SELECT rfm_group AS group, count(*) AS customers, sum(revenue) AS revenue FROM profiles "
                "WHERE rfm_group IS NOT NULL GROUP BY 1 ORDER BY 1"
            )
        )
        stats = (await self.session.execute(select(_stat.value, _stat.updated_at).where(_stat.key == "rfm"))).first()
        return {
            "cells": [dict(r) for r in cells.mappings()],
            "groups": [dict(r) for r in groups.mappings()],
            "cut_points": stats.value if stats else None,
            "refreshed_at": stats.updated_at if stats else None,
        }

    async def by_acquisition_channel(self, *, now: datetime) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text(
                "SELECT coalesce(acquisition_channel, 'unknown') AS channel, count(*) AS customers,"
                " count(*) FILTER (WHERE orders > 0) AS buyers, sum(revenue) AS revenue,"
                " round(sum(revenue) / nullif(count(*) FILTER (WHERE orders > 0), 0), 4) AS revenue_per_buyer,"
                " (count(*) FILTER (WHERE orders >= 2))::float8 / nullif(count(*) FILTER (WHERE orders > 0), 0) AS repeat_rate,"
                " (count(*) FILTER (WHERE orders > 0 AND seg_lifecycle(orders, first_purchase_at, last_purchase_at,"
                "   cadence_days, CAST(:now AS timestamptz)) IN ('new', 'active')))::float8"
                "   / nullif(count(*) FILTER (WHERE orders > 0), 0) AS retained_rate "
                "FROM profiles GROUP BY 1 ORDER BY revenue DESC NULLS LAST, 1"
            ),
            {"now": now},
        )
        return [dict(r) for r in rows.mappings()]
