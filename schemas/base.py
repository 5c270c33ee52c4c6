"""The frozen base every tickwave model shares."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, ClassVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict

from schemas.market import SHANGHAI


_BEIJING_OFFSET = timedelta(hours=8)


class Frozen(BaseModel):
    """Immutable model; `SCHEMA_VERSION` is written beside every encoded instance."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    SCHEMA_VERSION: ClassVar[int] = 1


def _to_shanghai(value: datetime) -> datetime:
    # decoding stored events is hot: skip the conversion when the time already carries
    # Beijing's offset (China has no daylight saving, so +08:00 is Asia/Shanghai)
    if value.utcoffset() == _BEIJING_OFFSET:
        return value
    return value.astimezone(SHANGHAI)


# Every time in tickwave is zone-aware and shown in Beijing time.
ShanghaiTime = Annotated[AwareDatetime, AfterValidator(_to_shanghai)]
