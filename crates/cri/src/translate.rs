//! CRI configs into vmrun's pod model: a `PodSandboxConfig` becomes the
//! `PodPlan` of a pod with no containers yet, a `ContainerConfig` one
//! `ContainerPlan`. The kubelet has already resolved the Pod (volumes are
//! host paths, env is final, restarts and probes are its own), so what is
//! left is validation and mapping; whatever vmrun cannot honour is refused
//! here with the field it came from.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use vmrun_pod::plan::{
    check_absolute_clean, ContainerPlan, MountPlan, PodPlan, PullPolicy, Resources, RestartPolicy,
    Security,
};

use crate::api;

/// A request field vmrun cannot accept, named by its path in the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidConfig {
    pub field: String,
    pub message: String,
}

/// CRI's SecurityProfile for seccomp; absent means unconfined, as with
/// containerd (the kubelet sends RuntimeDefault when the pod asks for it or
/// `seccompDefault` is on).
fn seccomp_profile(
    profile: Option<&api::SecurityProfile>,
) -> Result<vmrun_pod::seccomp::SeccompProfile, InvalidConfig> {
    use api::security_profile::ProfileType;
    use vmrun_pod::seccomp::SeccompProfile;
    const FIELD: &str = "config.linux.security_context.seccomp";
    let Some(p) = profile else {
        return Ok(SeccompProfile::Unconfined);
    };
    match ProfileType::try_from(p.profile_type) {
        Ok(ProfileType::RuntimeDefault) => Ok(SeccompProfile::RuntimeDefault),
        Ok(ProfileType::Unconfined) => Ok(SeccompProfile::Unconfined),
        Ok(ProfileType::Localhost) => {
            let path = PathBuf::from(&p.localhost_ref);
            if !path.is_absolute() {
                return Err(invalid(
                    FIELD,
                    format!(
                        "localhost_ref {:?} must be an absolute path",
                        p.localhost_ref
                    ),
                ));
            }
            Ok(SeccompProfile::Localhost(path))
        }
        Err(_) => Err(invalid(
            FIELD,
            format!("profile_type {} is not a CRI profile type", p.profile_type),
        )),
    }
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidConfig {
    InvalidConfig {
        field: field.to_string(),
        message: message.into(),
    }
}

/// CRI's NamespaceMode values.
mod ns_mode {
    pub const POD: i32 = 0;
    pub const CONTAINER: i32 = 1;
    pub const NODE: i32 = 2;
    pub const TARGET: i32 = 3;
}

fn sorted(map: &HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The pod of a sandbox; `uid` names its cgroup (`/vmrun/<uid>`) and must
/// be unique on the host, so the sandbox id is used, not the Pod's uid
/// (a static pod re-run keeps its uid).
pub fn pod_plan(
    sandbox_id: &str,
    handler: &str,
    config: &api::PodSandboxConfig,
) -> Result<PodPlan, InvalidConfig> {
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("config.metadata", "is required"))?;
    if meta.name.is_empty() {
        return Err(invalid("config.metadata.name", "is required"));
    }
    if meta.namespace.is_empty() {
        return Err(invalid("config.metadata.namespace", "is required"));
    }
    let linux = config.linux.clone().unwrap_or_default();
    let security = linux.security_context.clone().unwrap_or_default();
    let ns = security.namespace_options.clone().unwrap_or_default();
    let host_network = match ns.network {
        ns_mode::NODE => true,
        ns_mode::POD => false,
        other => {
            return Err(invalid(
                "config.linux.security_context.namespace_options.network",
                format!("mode {other} is not supported (POD or NODE)"),
            ))
        }
    };
    let (host_pid, share_process_namespace) = match ns.pid {
        ns_mode::POD => (false, true),
        ns_mode::CONTAINER => (false, false),
        ns_mode::NODE => (true, false),
        ns_mode::TARGET => {
            return Err(invalid(
                "config.linux.security_context.namespace_options.pid",
                "TARGET (a namespace of another container) is not supported by vmrun",
            ))
        }
        other => {
            return Err(invalid(
                "config.linux.security_context.namespace_options.pid",
                format!("unknown mode {other}"),
            ))
        }
    };
    let host_ipc = match ns.ipc {
        ns_mode::NODE => true,
        ns_mode::POD => false,
        other => {
            return Err(invalid(
                "config.linux.security_context.namespace_options.ipc",
                format!("mode {other} is not supported (POD or NODE)"),
            ))
        }
    };
    if ns
        .userns_options
        .as_ref()
        .is_some_and(|u| u.mode != ns_mode::NODE)
    {
        return Err(invalid(
            "config.linux.security_context.namespace_options.userns_options",
            "user namespaces are not supported by vmrun yet",
        ));
    }
    let hostname = if config.hostname.is_empty() {
        meta.name.chars().take(63).collect()
    } else {
        config.hostname.clone()
    };
    if !host_network && !valid_hostname(&hostname) {
        return Err(invalid(
            "config.hostname",
            format!("{hostname:?} is not a valid host name"),
        ));
    }
    let mut sysctls: Vec<(String, String)> = linux
        .sysctls
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    sysctls.sort();
    let resolv_conf = config.dns_config.as_ref().map(resolv_conf).transpose()?;
    if !config.log_directory.is_empty() && !config.log_directory.starts_with('/') {
        return Err(invalid(
            "config.log_directory",
            format!("{:?} is not an absolute path", config.log_directory),
        ));
    }
    for (i, p) in config.port_mappings.iter().enumerate() {
        if !(0..=65535).contains(&p.host_port) || !(1..=65535).contains(&p.container_port) {
            return Err(invalid(
                &format!("config.port_mappings[{i}]"),
                format!("ports {} -> {} out of range", p.host_port, p.container_port),
            ));
        }
    }
    // The kubelet sets the pod's total limits (containers plus overhead)
    // on the sandbox; a pod VM is sized from them.
    let pod_limits = linux
        .resources
        .as_ref()
        .map(resources_of)
        .transpose()
        .map_err(|e| invalid("config.linux.resources", e.to_string()))?;
    Ok(PodPlan {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: sandbox_id.to_string(),
        labels: sorted(&config.labels),
        annotations: sorted(&config.annotations),
        hostname,
        host_network,
        host_pid,
        host_ipc,
        share_process_namespace,
        // The kubelet decides restarts, probes and grace periods itself.
        restart_policy: RestartPolicy::Never,
        termination_grace: Duration::ZERO,
        runtime_class: Some(handler.to_string()),
        sysctls,
        init_containers: Vec::new(),
        containers: Vec::new(),
        volumes: Vec::new(),
        resolv_conf,
        pod_limits,
        // CNI gets them from the sandbox config (`owner::network`), as
        // containerd passes them; kept here so the pod model shows them.
        host_ports: config
            .port_mappings
            .iter()
            .enumerate()
            .filter(|(_, p)| p.host_port > 0)
            .map(|(i, p)| vmrun_pod::plan::HostPort {
                host_port: p.host_port as u16,
                container_port: p.container_port as u16,
                protocol: crate::owner::network::protocol(p.protocol).into(),
                host_ip: p.host_ip.clone(),
                field: format!("config.port_mappings[{i}]"),
            })
            .collect(),
    })
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The pod's /etc/resolv.conf from the kubelet's DNS config.
fn resolv_conf(dns: &api::DnsConfig) -> Result<String, InvalidConfig> {
    let mut text = String::new();
    if !dns.searches.is_empty() {
        text += &format!("search {}\n", dns.searches.join(" "));
    }
    for server in &dns.servers {
        server.parse::<IpAddr>().map_err(|_| {
            invalid(
                "config.dns_config.servers",
                format!("{server:?} is not an IP address"),
            )
        })?;
        text += &format!("nameserver {server}\n");
    }
    if !dns.options.is_empty() {
        text += &format!("options {}\n", dns.options.join(" "));
    }
    Ok(text)
}

/// What a container needs beyond its plan: CRI's own view of it.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub plan: ContainerPlan,
    /// The image as the kubelet named it (an image id or a reference).
    pub image: String,
    /// Where its CRI log goes, when the kubelet asked for one.
    pub log_path: Option<PathBuf>,
    /// `run_as_username`, which overrides the image's user.
    pub user_name: Option<String>,
}

/// CRI's MountPropagation values.
const PROPAGATION_PRIVATE: i32 = 0;
const PROPAGATION_HOST_TO_CONTAINER: i32 = 1;
const PROPAGATION_BIDIRECTIONAL: i32 = 2;

/// A container of the sandbox; `id` names it on the host (its cgroup and
/// directory), so it is the CRI container id, not the kubelet's name.
pub fn container_request(
    id: &str,
    config: &api::ContainerConfig,
    log_directory: &str,
) -> Result<ContainerRequest, InvalidConfig> {
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("config.metadata", "is required"))?;
    if meta.name.is_empty() {
        return Err(invalid("config.metadata.name", "is required"));
    }
    let image = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    if image.is_empty() {
        return Err(invalid("config.image.image", "is required"));
    }
    if !config.devices.is_empty() {
        return Err(invalid(
            "config.devices",
            "device passthrough is not supported by vmrun",
        ));
    }
    let mut env = Vec::new();
    for (i, kv) in config.envs.iter().enumerate() {
        if kv.key.is_empty() {
            return Err(invalid(&format!("config.envs[{i}].key"), "is empty"));
        }
        env.push((kv.key.clone(), kv.value.clone()));
    }
    let mut mounts = Vec::new();
    for (i, m) in config.mounts.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        if m.image.is_some() {
            return Err(invalid(&field, "image volumes are not supported by vmrun"));
        }
        check_absolute_clean(&m.container_path)
            .map_err(|e| invalid(&format!("{field}.container_path"), e))?;
        check_absolute_clean(&m.host_path)
            .map_err(|e| invalid(&format!("{field}.host_path"), e))?;
        let (from_host, to_host) = match m.propagation {
            PROPAGATION_PRIVATE => (false, false),
            PROPAGATION_HOST_TO_CONTAINER => (true, false),
            PROPAGATION_BIDIRECTIONAL => (true, true),
            other => {
                return Err(invalid(
                    &format!("{field}.propagation"),
                    format!("{other} is not a MountPropagation value"),
                ))
            }
        };
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(invalid(
                &field,
                "id-mapped mounts are not supported by vmrun",
            ));
        }
        mounts.push(MountPlan {
            volume: format!("cri-mount-{i}"),
            path: m.container_path.clone(),
            read_only: m.readonly,
            sub_path: None,
            host_path: Some(PathBuf::from(&m.host_path)),
            from_host_propagation: from_host,
            to_host_propagation: to_host,
        });
    }
    let linux = config.linux.clone().unwrap_or_default();
    let resources = linux
        .resources
        .as_ref()
        .map(resources_of)
        .transpose()?
        .unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    let cap_name = |c: &String| c.strip_prefix("CAP_").unwrap_or(c).to_string();
    if sc.run_as_group.is_some() && sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
        return Err(invalid(
            "config.linux.security_context.run_as_group",
            "is set without run_as_user or run_as_username",
        ));
    }
    // The kubelet always sends the lists; an empty one from another client
    // means "the defaults", as in containerd.
    let paths = |v: &Vec<String>| (!v.is_empty() || sc.privileged).then(|| v.clone());
    let security = Security {
        run_as_user: sc
            .run_as_user
            .map(|v| u32::try_from(v.value))
            .transpose()
            .map_err(|_| invalid("config.linux.security_context.run_as_user", "out of range"))?,
        run_as_group: sc
            .run_as_group
            .map(|v| u32::try_from(v.value))
            .transpose()
            .map_err(|_| invalid("config.linux.security_context.run_as_group", "out of range"))?,
        supplemental_groups: sc
            .supplemental_groups
            .iter()
            .map(|g| u32::try_from(*g))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                invalid(
                    "config.linux.security_context.supplemental_groups",
                    "out of range",
                )
            })?,
        read_only_root: sc.readonly_rootfs,
        privileged: sc.privileged,
        allow_privilege_escalation: Some(!sc.no_new_privs),
        caps_add: caps.add_capabilities.iter().map(cap_name).collect(),
        caps_drop: caps.drop_capabilities.iter().map(cap_name).collect(),
        masked_paths: paths(&sc.masked_paths),
        readonly_paths: paths(&sc.readonly_paths),
        seccomp: seccomp_profile(sc.seccomp.as_ref())?,
    };
    let log_path = (!config.log_path.is_empty() && !log_directory.is_empty())
        .then(|| PathBuf::from(log_directory).join(&config.log_path));
    if let Some(path) = &log_path {
        if config.log_path.starts_with('/') || config.log_path.split('/').any(|c| c == "..") {
            return Err(invalid(
                "config.log_path",
                format!(
                    "{:?} must stay inside the sandbox's log directory",
                    path.display()
                ),
            ));
        }
    }
    let nonempty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Ok(ContainerRequest {
        plan: ContainerPlan {
            name: id.to_string(),
            image: image.clone(),
            pull_policy: PullPolicy::Never,
            command: nonempty(&config.command),
            args: nonempty(&config.args),
            env,
            working_dir: (!config.working_dir.is_empty()).then(|| config.working_dir.clone()),
            mounts,
            resources,
            security,
            liveness: None,
            readiness: None,
            startup: None,
            post_start: None,
            pre_stop: None,
        },
        image,
        log_path,
        user_name: (!sc.run_as_username.is_empty()).then(|| sc.run_as_username.clone()),
    })
}

/// CRI's cgroup values into the plan's Kubernetes-style resources; the spec
/// maps them back to the same cgroup values.
pub fn resources_of(r: &api::LinuxContainerResources) -> Result<Resources, InvalidConfig> {
    if r.memory_limit_in_bytes < 0 || r.cpu_quota < -1 || r.cpu_period < 0 || r.cpu_shares < 0 {
        return Err(invalid(
            "config.linux.resources",
            "negative memory limit, CPU quota, period or shares",
        ));
    }
    let memory_limit = (r.memory_limit_in_bytes > 0).then_some(r.memory_limit_in_bytes as u64);
    let period = if r.cpu_period > 0 {
        r.cpu_period
    } else {
        100_000
    };
    let cpu_limit_milli = (r.cpu_quota > 0).then(|| (r.cpu_quota as u64 * 1000) / period as u64);
    // The kubelet maps a request of m millicores to m * 1024 / 1000 shares.
    let cpu_request_milli = (r.cpu_shares > 2).then(|| (r.cpu_shares as u64 * 1000).div_ceil(1024));
    Ok(Resources {
        memory_limit,
        memory_request: None,
        cpu_limit_milli,
        cpu_request_milli,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox_config() -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web".into(),
            log_directory: "/var/log/pods/default_web_u1".into(),
            dns_config: Some(api::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_sandbox_config_becomes_a_pod_with_the_kubelets_dns() {
        let plan = pod_plan("id1", "native", &sandbox_config()).unwrap();
        assert_eq!(plan.name, "web");
        assert_eq!(plan.uid, "id1");
        assert!(!plan.host_network);
        assert!(
            plan.share_process_namespace,
            "pid POD shares the pod's pid namespace"
        );
        assert_eq!(
            plan.resolv_conf.as_deref(),
            Some("search default.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n")
        );
    }

    #[test]
    fn bad_sandbox_configs_name_the_field() {
        let mut c = sandbox_config();
        c.metadata = None;
        assert_eq!(
            pod_plan("i", "native", &c).unwrap_err().field,
            "config.metadata"
        );
        let mut c = sandbox_config();
        c.hostname = "bad_host!".into();
        assert_eq!(
            pod_plan("i", "native", &c).unwrap_err().field,
            "config.hostname"
        );
        let mut c = sandbox_config();
        c.dns_config.as_mut().unwrap().servers = vec!["not-an-ip".into()];
        let e = pod_plan("i", "native", &c).unwrap_err();
        assert!(e.to_string().contains("not-an-ip"), "{e}");
        let mut c = sandbox_config();
        c.linux = Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    pid: ns_mode::TARGET,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(pod_plan("i", "native", &c)
            .unwrap_err()
            .field
            .ends_with(".pid"));
    }

    fn container_config() -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: "app".into(),
                attempt: 2,
            }),
            image: Some(api::ImageSpec {
                image: "sha256:abc".into(),
                ..Default::default()
            }),
            command: vec!["/bin/sh".into()],
            args: vec!["-c".into(), "echo hi".into()],
            envs: vec![api::KeyValue {
                key: "A".into(),
                value: "1".into(),
            }],
            mounts: vec![api::Mount {
                container_path: "/data".into(),
                host_path: "/var/lib/kubelet/pods/u1/volumes/x".into(),
                readonly: true,
                ..Default::default()
            }],
            log_path: "app/2.log".into(),
            linux: Some(api::LinuxContainerConfig {
                resources: Some(api::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    cpu_shares: 512,
                    memory_limit_in_bytes: 64 << 20,
                    ..Default::default()
                }),
                security_context: Some(api::LinuxContainerSecurityContext {
                    capabilities: Some(api::Capability {
                        add_capabilities: vec!["CAP_NET_ADMIN".into()],
                        ..Default::default()
                    }),
                    no_new_privs: true,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_container_config_becomes_a_plan_with_host_mounts_and_limits() {
        let r = container_request("cid", &container_config(), "/var/log/pods/p").unwrap();
        assert_eq!(r.plan.name, "cid");
        assert_eq!(
            r.plan.command.as_deref(),
            Some(&["/bin/sh".to_string()][..])
        );
        assert_eq!(r.plan.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(
            r.plan.mounts[0].host_path.as_deref(),
            Some(std::path::Path::new("/var/lib/kubelet/pods/u1/volumes/x"))
        );
        assert!(r.plan.mounts[0].read_only);
        assert_eq!(r.plan.resources.memory_limit, Some(64 << 20));
        assert_eq!(r.plan.resources.cpu_limit_milli, Some(500));
        assert_eq!(r.plan.resources.cpu_request_milli, Some(500));
        assert_eq!(r.plan.security.caps_add, vec!["NET_ADMIN".to_string()]);
        assert_eq!(r.plan.security.allow_privilege_escalation, Some(false));
        assert_eq!(r.log_path, Some(PathBuf::from("/var/log/pods/p/app/2.log")));
    }

    #[test]
    fn bad_container_configs_name_the_field() {
        let mut c = container_config();
        c.image = None;
        assert_eq!(
            container_request("c", &c, "").unwrap_err().field,
            "config.image.image"
        );
        let mut c = container_config();
        c.mounts[0].host_path = "relative".into();
        assert_eq!(
            container_request("c", &c, "").unwrap_err().field,
            "config.mounts[0].host_path"
        );
        let mut c = container_config();
        c.log_path = "../../etc/passwd".into();
        assert_eq!(
            container_request("c", &c, "/var/log/pods/p")
                .unwrap_err()
                .field,
            "config.log_path"
        );
        let mut c = container_config();
        c.envs[0].key.clear();
        assert!(container_request("c", &c, "").is_err());
    }

    #[test]
    fn seccomp_profiles_map_as_containerd_reads_them() {
        use vmrun_pod::seccomp::SeccompProfile;
        let with = |profile: Option<api::SecurityProfile>| {
            let mut c = container_config();
            let linux = c.linux.as_mut().unwrap();
            linux.security_context.as_mut().unwrap().seccomp = profile;
            container_request("c", &c, "").map(|r| r.plan.security.seccomp)
        };
        let profile = |t: api::security_profile::ProfileType, path: &str| {
            Some(api::SecurityProfile {
                profile_type: t as i32,
                localhost_ref: path.into(),
            })
        };
        use api::security_profile::ProfileType;
        assert_eq!(with(None).unwrap(), SeccompProfile::Unconfined);
        assert_eq!(
            with(profile(ProfileType::RuntimeDefault, "")).unwrap(),
            SeccompProfile::RuntimeDefault
        );
        assert_eq!(
            with(profile(ProfileType::Localhost, "/etc/p.json")).unwrap(),
            SeccompProfile::Localhost("/etc/p.json".into())
        );
        let e = with(profile(ProfileType::Localhost, "p.json")).unwrap_err();
        assert_eq!(e.field, "config.linux.security_context.seccomp");
        assert!(with(Some(api::SecurityProfile {
            profile_type: 9,
            localhost_ref: String::new()
        }))
        .is_err());
    }
}
