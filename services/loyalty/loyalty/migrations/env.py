from crm_common.migrations import run_env
from loyalty.models import Base

run_env(Base.metadata)
