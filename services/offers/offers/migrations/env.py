from crm_common.migrations import run_env
from offers.models import Base

run_env(Base.metadata)
