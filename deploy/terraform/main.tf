locals {
  # The units are the ones in deploy/systemd, read at plan time so the two never drift.
  sysusers_conf = file("${path.module}/../systemd/twinmesh.sysusers.conf")
  pnicd_unit    = file("${path.module}/../systemd/pnicd.service")
  twind_unit    = file("${path.module}/../systemd/twind@.service")

  peer_uri = {
    for name, host in var.hosts : name => (
      host.key == null
      ? "tcp://${host.address}:${var.link_port}"
      : "tcp://${host.address}:${var.link_port}?key=${host.key}"
    )
  }

  # TOML written with jsonencode: a JSON string or array of strings is valid TOML.
  pnicd_config = {
    for name, host in var.hosts : name => join("\n", [
      "# /etc/twinmesh/pnicd.toml for host ${name}, written by the twinmesh Terraform module.",
      "listen = ${jsonencode(["tcp://${host.address}:${var.link_port}"])}",
      "peers = ${jsonencode([for peer in host.peers : local.peer_uri[peer]])}",
      "health = ${jsonencode("127.0.0.1:${var.health_port}")}",
      "log_format = \"json\"",
      "",
    ])
  }

  user_data = {
    for name, host in var.hosts : name => "#cloud-config\n${yamlencode({
      package_update = true
      packages       = ["python3", "python3-venv"]
      write_files = [
        { path = "/etc/sysusers.d/twinmesh.conf", permissions = "0644", content = local.sysusers_conf },
        { path = "/etc/systemd/system/pnicd.service", permissions = "0644", content = local.pnicd_unit },
        { path = "/etc/systemd/system/twind@.service", permissions = "0644", content = local.twind_unit },
        { path = "/etc/twinmesh/pnicd.toml", permissions = "0644", content = local.pnicd_config[name] },
      ]
      runcmd = concat(
        [
          ["systemd-sysusers"],
          ["python3", "-m", "venv", "/opt/twinmesh"],
          ["/opt/twinmesh/bin/pip", "install", "--no-cache-dir", var.twinmesh_package],
          ["systemctl", "daemon-reload"],
          ["systemctl", "enable", "--now", "pnicd.service"],
        ],
        [for twin in host.twins : ["systemctl", "enable", "--now", "twind@${twin}.service"]],
      )
    })}"
  }
}
