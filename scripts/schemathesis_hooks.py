# tus chunks (PATCH of an upload) are raw bytes like application/octet-stream.
import schemathesis

schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
