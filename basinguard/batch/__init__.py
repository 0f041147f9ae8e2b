"""Production batch generation: prompt files (`prompts`), OUT_DIR and its manifest (`output`), the job and its
local executor (`job`), the Ray executor (`ray_executor`). See docs/batch.md."""
