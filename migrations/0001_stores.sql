-- The shared state of every sdserve process of a deployment. Portable SQL: the same file
-- runs on SQLite (the embedded default) and PostgreSQL (clusters). Times: *_at are Unix
-- seconds (shown by the API), *_ms are milliseconds of the database's own clock (leases).

-- Every running process, with its role; a process whose heartbeat is older than the lease
-- timeout is dead and the jobs it owned are marked interrupted.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    host TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL
);

-- /align jobs; `owner` is the instance that claimed it.
CREATE TABLE align_jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    adapter_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    queued_ms BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    owner TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    seed TEXT NOT NULL,
    step BIGINT NOT NULL DEFAULT 0,
    total_steps BIGINT NOT NULL,
    metrics TEXT NOT NULL,
    stop_reason TEXT,
    fine_tuned_adapter TEXT,
    error_code TEXT,
    error_message TEXT,
    request TEXT NOT NULL
);
CREATE INDEX align_jobs_queue ON align_jobs (status, queued_ms);

CREATE TABLE align_events (
    job_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT,
    PRIMARY KEY (job_id, seq)
);

-- Image jobs run on the replica that accepted them (`owner`); their records are here so that
-- any replica can read or cancel them and they survive restarts. `version` is the SSE id.
CREATE TABLE image_jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    owner TEXT NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    version BIGINT NOT NULL,
    step BIGINT NOT NULL DEFAULT 0,
    total_steps BIGINT NOT NULL,
    images_done BIGINT NOT NULL DEFAULT 0,
    parameters TEXT NOT NULL,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    finished_ms BIGINT
);
CREATE INDEX image_jobs_finished ON image_jobs (finished_ms);

-- The adapter registry: which blob each name serves. Deleted names stay as tombstones so that
-- replicas polling by revision see the deletion.
CREATE TABLE adapters (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    blob_key TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    meta TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision BIGINT NOT NULL,
    deleted BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX adapters_revision ON adapters (revision);

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('adapters', 0);
