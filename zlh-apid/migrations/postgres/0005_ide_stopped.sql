-- The owner stopped the server's code-server (`POST /api/servers/:id/codeserver/stop`): its IDE
-- is refused with "stopped" until code-server is started again, rather than proxied to nothing.
ALTER TABLE servers ADD COLUMN ide_stopped BIGINT NOT NULL DEFAULT 0;
