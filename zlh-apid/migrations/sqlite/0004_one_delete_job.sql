-- At most one delete job under way per server: two DELETEs at once start one job, not two.
CREATE UNIQUE INDEX jobs_one_active_delete ON jobs(server_id) WHERE kind = 'delete' AND state IN ('queued', 'running');
