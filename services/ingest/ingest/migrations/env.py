from crm_common.migrations import run_env

from ingest.models import Base

run_env(Base.metadata)
