from crm_common.migrations import run_env
from segmentation.models import Base

run_env(Base.metadata)
