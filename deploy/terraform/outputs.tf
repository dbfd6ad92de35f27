output "user_data" {
  description = "cloud-init user-data per host: installs twinmesh, its systemd units and pnicd.toml, and starts them."
  value       = local.user_data
}

output "pnicd_config" {
  description = "/etc/twinmesh/pnicd.toml per host."
  value       = local.pnicd_config
}

output "peer_uri" {
  description = "The URI other NICs dial to reach each host (pinned with ?key= when the key is known)."
  value       = local.peer_uri
}

output "link_port" {
  description = "The TCP port to open between the hosts."
  value       = var.link_port
}
