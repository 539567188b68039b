//! A validated, resolved pod: everything a runtime needs, with every reference
//! (configMap keys, secret keys, fieldRefs, volume names) already checked.
//!
//! Validation happens here, before anything is created, so bad input never leaves
//! a half-made pod behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;

use crate::manifest::Manifest;
use crate::quantity::{parse_bytes, parse_millicpu};

#[derive(Debug, thiserror::Error)]
#[error("pod {pod:?}: {field}: {message}")]
pub struct PlanError {
    pub pod: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub hostname: String,
    pub host_network: bool,
    pub host_pid: bool,
    pub host_ipc: bool,
    pub share_process_namespace: bool,
    pub restart_policy: RestartPolicy,
    pub termination_grace: Duration,
    pub runtime_class: Option<String>,
    pub sysctls: Vec<(String, String)>,
    pub init_containers: Vec<ContainerPlan>,
    pub containers: Vec<ContainerPlan>,
    pub volumes: Vec<VolumePlan>,
    /// The pod's /etc/resolv.conf when the caller decided it (CRI's DNSConfig);
    /// None copies the host's.
    #[serde(default)]
    pub resolv_conf: Option<String>,
    /// Limits for the whole pod when its containers are not known yet
    /// (CRI's sandbox resources: the sum of the containers' limits the
    /// kubelet computed); sizes a pod VM made before its containers.
    #[serde(default)]
    pub pod_limits: Option<Resources>,
    /// The containers' `ports` with a `hostPort`: what the CNI portmap
    /// plugin maps on the host (as kubelet passes them to CRI). Empty with
    /// hostNetwork, where the container binds the host's port itself.
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
}

/// One container port published on the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostPort {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`, as the portmap plugin names them.
    pub protocol: String,
    /// The host address to listen on; empty for all.
    pub host_ip: String,
    /// Where the manifest declared it (`spec.containers[0].ports[1]`).
    pub field: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerPlan {
    pub name: String,
    pub image: String,
    pub pull_policy: PullPolicy,
    /// Kubernetes `command`/`args`, still to be combined with the image's Entrypoint/Cmd.
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    /// Resolved env in definition order (envFrom, then env); image env comes later.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<MountPlan>,
    pub resources: Resources,
    pub security: Security,
    pub liveness: Option<ProbePlan>,
    pub readiness: Option<ProbePlan>,
    pub startup: Option<ProbePlan>,
    pub post_start: Option<Handler>,
    pub pre_stop: Option<Handler>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub memory_limit: Option<u64>,
    pub memory_request: Option<u64>,
    pub cpu_limit_milli: Option<u64>,
    pub cpu_request_milli: Option<u64>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Security {
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub supplemental_groups: Vec<u32>,
    pub read_only_root: bool,
    pub privileged: bool,
    pub allow_privilege_escalation: Option<bool>,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    /// Paths masked and made read-only in /proc and /sys, when the caller
    /// decided them (CRI's kubelet does); None takes containerd's defaults.
    #[serde(default)]
    pub masked_paths: Option<Vec<String>>,
    #[serde(default)]
    pub readonly_paths: Option<Vec<String>>,
    /// The container's seccomp profile (its own, else the pod's).
    #[serde(default)]
    pub seccomp: crate::seccomp::SeccompProfile,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountPlan {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
    pub sub_path: Option<String>,
    /// A host path bound directly, for CRI mounts (the kubelet resolved the
    /// volume already); `volume` is then only a label.
    #[serde(default)]
    pub host_path: Option<PathBuf>,
    /// Mounts made under it on the host appear in the container
    /// (Kubernetes' HostToContainer, an `rslave` bind); default private.
    #[serde(default)]
    pub from_host_propagation: bool,
    /// Mounts the container makes under it appear on the host too
    /// (Kubernetes' Bidirectional, an `rshared` bind; with
    /// `from_host_propagation`).
    #[serde(default)]
    pub to_host_propagation: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Handler {
    Exec(Vec<String>),
    HttpGet {
        port: u16,
        path: String,
        host: Option<String>,
        headers: Vec<(String, String)>,
    },
    TcpSocket {
        port: u16,
    },
    Sleep(Duration),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProbePlan {
    pub handler: Handler,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// A file a volume holds: path relative to the volume root, content, mode.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum VolumeSource {
    EmptyDir {
        memory: bool,
        size_limit: Option<u64>,
    },
    HostPath {
        path: String,
        kind: String,
    },
    /// configMap, secret, downwardAPI and projected: files computed up front.
    Files(Vec<VolumeFile>),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VolumePlan {
    pub name: String,
    pub source: VolumeSource,
}

impl PodPlan {
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        self.init_containers.iter().chain(&self.containers)
    }
    pub fn volume(&self, name: &str) -> Option<&VolumePlan> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

struct Ctx<'a> {
    manifest: &'a Manifest,
    pod_name: String,
    namespace: String,
    uid: String,
    node_name: String,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> PlanError {
        PlanError {
            pod: self.pod_name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Validates the manifest and resolves every reference in it.
pub fn plan(manifest: &Manifest, uid: &str, node_name: &str) -> Result<PodPlan, PlanError> {
    let pod = &manifest.pod;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let ctx = Ctx {
        manifest,
        pod_name: pod_name.clone(),
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        uid: uid.to_string(),
        node_name: node_name.to_string(),
    };
    if !is_dns_subdomain(&pod_name) {
        return Err(ctx.err(
            "metadata.name",
            format!("{pod_name:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253)"),
        ));
    }
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| ctx.err("spec", "missing"))?;
    if spec.containers.is_empty() {
        return Err(ctx.err("spec.containers", "a pod needs at least one container"));
    }

    let restart_policy = match spec.restart_policy.as_deref() {
        None | Some("Always") => RestartPolicy::Always,
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        Some(other) => {
            return Err(ctx.err(
                "spec.restartPolicy",
                format!("{other:?} is not one of Always, OnFailure, Never"),
            ))
        }
    };

    let volumes = plan_volumes(&ctx, spec)?;
    let volume_names: BTreeSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();

    let mut seen = BTreeSet::new();
    let mut plan_list =
        |list: &[core::Container], field: &str| -> Result<Vec<ContainerPlan>, PlanError> {
            list.iter()
                .enumerate()
                .map(|(i, c)| {
                    let field = format!("{field}[{i}]");
                    if !seen.insert(c.name.clone()) {
                        return Err(ctx.err(
                            format!("{field}.name"),
                            format!("duplicate container name {:?}", c.name),
                        ));
                    }
                    plan_container(&ctx, spec, c, &field, &volume_names)
                })
                .collect()
        };
    let init_containers = plan_list(
        spec.init_containers.as_deref().unwrap_or_default(),
        "spec.initContainers",
    )?;
    let containers = plan_list(&spec.containers, "spec.containers")?;

    let security = spec.security_context.as_ref();
    let sysctls = security
        .and_then(|s| s.sysctls.as_ref())
        .map(|list| {
            list.iter()
                .map(|s| (s.name.clone(), s.value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let hostname = spec.hostname.clone().unwrap_or_else(|| pod_name.clone());
    if !is_dns_label(&hostname) && spec.hostname.is_some() {
        return Err(ctx.err(
            "spec.hostname",
            format!("{hostname:?} is not a valid DNS label"),
        ));
    }
    let host_ports = plan_host_ports(&ctx, spec)?;
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    if grace < 0 {
        return Err(ctx.err("spec.terminationGracePeriodSeconds", "must not be negative"));
    }

    Ok(PodPlan {
        name: pod_name,
        namespace: ctx.namespace.clone(),
        uid: uid.to_string(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        hostname: hostname.chars().take(63).collect(),
        host_network: spec.host_network.unwrap_or(false),
        host_pid: spec.host_pid.unwrap_or(false),
        host_ipc: spec.host_ipc.unwrap_or(false),
        share_process_namespace: spec.share_process_namespace.unwrap_or(false),
        restart_policy,
        termination_grace: Duration::from_secs(grace as u64),
        runtime_class: spec.runtime_class_name.clone(),
        sysctls,
        init_containers,
        containers,
        volumes,
        resolv_conf: None,
        pod_limits: None,
        host_ports,
    })
}

/// The containers' ports that ask for a host port, checked as the API
/// server checks them: numbers in range, a known protocol, no host port
/// declared twice for the same protocol and address, and with hostNetwork
/// the host port equal to the container port (nothing is mapped then).
fn plan_host_ports(ctx: &Ctx, spec: &core::PodSpec) -> Result<Vec<HostPort>, PlanError> {
    let host_network = spec.host_network.unwrap_or(false);
    let mut out: Vec<HostPort> = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{i}].ports[{j}]");
            let container_port = u16::try_from(p.container_port)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ctx.err(
                        format!("{field}.containerPort"),
                        format!("{} is not a port (1-65535)", p.container_port),
                    )
                })?;
            let protocol = match p.protocol.as_deref() {
                None | Some("TCP") => "tcp",
                Some("UDP") => "udp",
                Some("SCTP") => "sctp",
                Some(other) => {
                    return Err(ctx.err(
                        format!("{field}.protocol"),
                        format!("{other:?} is not one of TCP, UDP, SCTP"),
                    ))
                }
            };
            let Some(host_port) = p.host_port.filter(|n| *n != 0) else {
                continue;
            };
            let host_port = u16::try_from(host_port)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ctx.err(
                        format!("{field}.hostPort"),
                        format!("{host_port} is not a port (1-65535)"),
                    )
                })?;
            if host_network {
                if host_port != container_port {
                    return Err(ctx.err(
                        format!("{field}.hostPort"),
                        format!(
                            "{host_port} must equal containerPort {container_port} with hostNetwork"
                        ),
                    ));
                }
                continue;
            }
            let host_ip = p.host_ip.clone().unwrap_or_default();
            if !host_ip.is_empty() && host_ip.parse::<std::net::IpAddr>().is_err() {
                return Err(ctx.err(
                    format!("{field}.hostIP"),
                    format!("{host_ip:?} is not an IP address"),
                ));
            }
            if let Some(first) = out.iter().find(|o| {
                o.host_port == host_port && o.protocol == protocol && o.host_ip == host_ip
            }) {
                return Err(ctx.err(
                    format!("{field}.hostPort"),
                    format!(
                        "{host_port}/{protocol} is already published by {}",
                        first.field
                    ),
                ));
            }
            out.push(HostPort {
                host_port,
                container_port,
                protocol: protocol.into(),
                host_ip,
                field,
            });
        }
    }
    Ok(out)
}

fn plan_container(
    ctx: &Ctx,
    spec: &core::PodSpec,
    c: &core::Container,
    field: &str,
    volume_names: &BTreeSet<&str>,
) -> Result<ContainerPlan, PlanError> {
    if !is_dns_label(&c.name) {
        return Err(ctx.err(
            format!("{field}.name"),
            format!("{:?} is not a valid DNS label", c.name),
        ));
    }
    let image = c.image.clone().unwrap_or_default();
    if image.trim().is_empty() {
        return Err(ctx.err(format!("{field}.image"), "missing"));
    }
    let pull_policy = match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        Some("Never") => PullPolicy::Never,
        None if image_is_latest(&image) => PullPolicy::Always,
        None => PullPolicy::IfNotPresent,
        Some(other) => {
            return Err(ctx.err(
                format!("{field}.imagePullPolicy"),
                format!("{other:?} is not one of Always, IfNotPresent, Never"),
            ))
        }
    };
    let resources = plan_resources(ctx, c, field)?;
    let env = plan_env(ctx, c, field, &resources)?;

    let mut mount_paths = BTreeSet::new();
    let mut mounts = Vec::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mfield = format!("{field}.volumeMounts[{i}]");
        if !volume_names.contains(m.name.as_str()) {
            return Err(ctx.err(
                format!("{mfield}.name"),
                format!("no volume named {:?} in spec.volumes", m.name),
            ));
        }
        check_absolute_clean(&m.mount_path)
            .map_err(|msg| ctx.err(format!("{mfield}.mountPath"), msg))?;
        if !mount_paths.insert(m.mount_path.trim_end_matches('/').to_string()) {
            return Err(ctx.err(
                format!("{mfield}.mountPath"),
                format!("{:?} is mounted twice", m.mount_path),
            ));
        }
        let sub_path = m.sub_path.clone().filter(|s| !s.is_empty());
        if let Some(sub) = &sub_path {
            check_relative_clean(sub).map_err(|msg| ctx.err(format!("{mfield}.subPath"), msg))?;
        }
        mounts.push(MountPlan {
            volume: m.name.clone(),
            path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
            sub_path,
            host_path: None,
            from_host_propagation: false,
            to_host_propagation: false,
        });
    }

    if let Some(dir) = &c.working_dir {
        check_absolute_clean(dir).map_err(|msg| ctx.err(format!("{field}.workingDir"), msg))?;
    }

    let pod_sc = spec.security_context.as_ref();
    let sc = c.security_context.as_ref();
    let id = |v: Option<i64>, name: &str| -> Result<Option<u32>, PlanError> {
        v.map(|v| {
            u32::try_from(v).map_err(|_| {
                ctx.err(
                    format!("{field}.securityContext.{name}"),
                    format!("{v} is not a valid id"),
                )
            })
        })
        .transpose()
    };
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let security = Security {
        run_as_user: id(
            sc.and_then(|s| s.run_as_user)
                .or(pod_sc.and_then(|s| s.run_as_user)),
            "runAsUser",
        )?,
        run_as_group: id(
            sc.and_then(|s| s.run_as_group)
                .or(pod_sc.and_then(|s| s.run_as_group)),
            "runAsGroup",
        )?,
        supplemental_groups: pod_sc
            .and_then(|s| s.supplemental_groups.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|g| id(Some(g), "supplementalGroups").map(|g| g.unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        read_only_root: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
        allow_privilege_escalation: sc.and_then(|s| s.allow_privilege_escalation),
        caps_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
        caps_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
        masked_paths: None,
        readonly_paths: None,
        seccomp: match sc
            .and_then(|s| s.seccomp_profile.as_ref())
            .map(|p| (p, "securityContext"))
            .or_else(|| {
                pod_sc
                    .and_then(|s| s.seccomp_profile.as_ref())
                    .map(|p| (p, "pod securityContext"))
            }) {
            None => Default::default(),
            Some((p, whose)) => {
                crate::seccomp::from_kubernetes(&p.type_, p.localhost_profile.as_deref()).map_err(
                    |m| {
                        let field = if whose == "securityContext" {
                            format!("{field}.securityContext.seccompProfile")
                        } else {
                            "spec.securityContext.seccompProfile".to_string()
                        };
                        ctx.err(field, m)
                    },
                )?
            }
        },
    };
    if sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        == Some(true)
        && security.run_as_user == Some(0)
    {
        return Err(ctx.err(
            format!("{field}.securityContext.runAsNonRoot"),
            "set, but runAsUser is 0",
        ));
    }

    let probe = |p: &Option<core::Probe>, name: &str| {
        p.as_ref()
            .map(|p| plan_probe(ctx, p, &format!("{field}.{name}")))
            .transpose()
    };
    let lifecycle = c.lifecycle.as_ref();
    let hook = |h: Option<&core::LifecycleHandler>, name: &str| {
        h.map(|h| {
            plan_handler(
                ctx,
                h.exec.as_ref(),
                h.http_get.as_ref(),
                h.tcp_socket.as_ref(),
                h.sleep.as_ref(),
                &format!("{field}.lifecycle.{name}"),
            )
        })
        .transpose()
    };
    Ok(ContainerPlan {
        name: c.name.clone(),
        image: image.trim().to_string(),
        pull_policy,
        command: c.command.clone(),
        args: c.args.clone(),
        env,
        working_dir: c.working_dir.clone(),
        mounts,
        resources,
        security,
        liveness: probe(&c.liveness_probe, "livenessProbe")?,
        readiness: probe(&c.readiness_probe, "readinessProbe")?,
        startup: probe(&c.startup_probe, "startupProbe")?,
        post_start: hook(lifecycle.and_then(|l| l.post_start.as_ref()), "postStart")?,
        pre_stop: hook(lifecycle.and_then(|l| l.pre_stop.as_ref()), "preStop")?,
    })
}

fn image_is_latest(image: &str) -> bool {
    if image.contains('@') {
        return false;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => true,
        Some((_, tag)) => tag == "latest",
    }
}

fn plan_resources(ctx: &Ctx, c: &core::Container, field: &str) -> Result<Resources, PlanError> {
    let Some(r) = &c.resources else {
        return Ok(Resources::default());
    };
    let get = |map: &Option<
        BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               which: &str,
               key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .map(|q| (format!("{field}.resources.{which}.{key}"), q.0.clone()))
    };
    let mem = |v: Option<(String, String)>| {
        v.map(|(f, q)| parse_bytes(&q).map_err(|e| ctx.err(f, e.to_string())))
            .transpose()
    };
    let cpu = |v: Option<(String, String)>| {
        v.map(|(f, q)| parse_millicpu(&q).map_err(|e| ctx.err(f, e.to_string())))
            .transpose()
    };
    for map in [&r.limits, &r.requests] {
        for key in map.iter().flat_map(|m| m.keys()) {
            if !matches!(key.as_str(), "cpu" | "memory" | "ephemeral-storage") {
                return Err(ctx.err(
                    format!("{field}.resources"),
                    format!("resource {key:?} is not supported"),
                ));
            }
        }
    }
    let mut res = Resources {
        memory_limit: mem(get(&r.limits, "limits", "memory"))?,
        memory_request: mem(get(&r.requests, "requests", "memory"))?,
        cpu_limit_milli: cpu(get(&r.limits, "limits", "cpu"))?,
        cpu_request_milli: cpu(get(&r.requests, "requests", "cpu"))?,
    };
    // As the API server defaults them: a request without a limit is the limit's value.
    res.memory_request = res.memory_request.or(res.memory_limit);
    res.cpu_request_milli = res.cpu_request_milli.or(res.cpu_limit_milli);
    if let (Some(req), Some(lim)) = (res.memory_request, res.memory_limit) {
        if req > lim {
            return Err(ctx.err(
                format!("{field}.resources.requests.memory"),
                "must be less than or equal to the memory limit",
            ));
        }
    }
    if res.memory_limit == Some(0) {
        return Err(ctx.err(
            format!("{field}.resources.limits.memory"),
            "must be greater than zero",
        ));
    }
    Ok(res)
}

fn plan_env(
    ctx: &Ctx,
    c: &core::Container,
    field: &str,
    res: &Resources,
) -> Result<Vec<(String, String)>, PlanError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            env.push((k, v));
        }
    };
    for (i, from) in c.env_from.iter().flatten().enumerate() {
        let efield = format!("{field}.envFrom[{i}]");
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match ctx.manifest.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(ctx.err(
                        format!("{efield}.configMapRef"),
                        format!("configMap {:?} not found in the manifest", r.name),
                    ))
                }
            }
        }
        if let Some(r) = &from.secret_ref {
            match ctx.manifest.secrets.get(&r.name) {
                Some(s) => {
                    for (k, v) in secret_entries(s) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into_owned(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(ctx.err(
                        format!("{efield}.secretRef"),
                        format!("secret {:?} not found in the manifest", r.name),
                    ))
                }
            }
        }
    }
    for (i, var) in c.env.iter().flatten().enumerate() {
        let vfield = format!("{field}.env[{i}]");
        if var.name.is_empty() || var.name.contains('=') {
            return Err(ctx.err(
                format!("{vfield}.name"),
                format!("{:?} is not a valid variable name", var.name),
            ));
        }
        let value = match &var.value_from {
            None => Some(crate::command::expand(
                var.value.as_deref().unwrap_or(""),
                &env,
            )),
            Some(src) => resolve_env_source(ctx, src, &vfield, res)?,
        };
        if let Some(value) = value {
            set(&mut env, var.name.clone(), value);
        }
    }
    Ok(env)
}

fn resolve_env_source(
    ctx: &Ctx,
    src: &core::EnvVarSource,
    field: &str,
    res: &Resources,
) -> Result<Option<String>, PlanError> {
    if let Some(r) = &src.config_map_key_ref {
        let value = ctx
            .manifest
            .config_maps
            .get(&r.name)
            .and_then(|cm| cm.data.as_ref()?.get(&r.key).cloned());
        return match value {
            Some(v) => Ok(Some(v)),
            None if r.optional == Some(true) => Ok(None),
            None => Err(ctx.err(
                format!("{field}.valueFrom.configMapKeyRef"),
                missing_key(
                    "configMap",
                    &r.name,
                    &r.key,
                    ctx.manifest.config_maps.contains_key(&r.name),
                ),
            )),
        };
    }
    if let Some(r) = &src.secret_key_ref {
        let value = ctx
            .manifest
            .secrets
            .get(&r.name)
            .and_then(|s| secret_entries(s).into_iter().find(|(k, _)| *k == r.key));
        return match value {
            Some((_, v)) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if r.optional == Some(true) => Ok(None),
            None => Err(ctx.err(
                format!("{field}.valueFrom.secretKeyRef"),
                missing_key(
                    "secret",
                    &r.name,
                    &r.key,
                    ctx.manifest.secrets.contains_key(&r.name),
                ),
            )),
        };
    }
    if let Some(r) = &src.field_ref {
        return field_ref(ctx, &r.field_path)
            .map(Some)
            .map_err(|msg| ctx.err(format!("{field}.valueFrom.fieldRef.fieldPath"), msg));
    }
    if let Some(r) = &src.resource_field_ref {
        let divisor = r
            .divisor
            .as_ref()
            .map(|d| d.0.clone())
            .unwrap_or_else(|| "1".into());
        let divisor = crate::quantity::parse_milli(&divisor).map_err(|e| {
            ctx.err(
                format!("{field}.valueFrom.resourceFieldRef.divisor"),
                e.to_string(),
            )
        })?;
        if divisor == 0 {
            return Err(ctx.err(
                format!("{field}.valueFrom.resourceFieldRef.divisor"),
                "must not be zero",
            ));
        }
        let milli: u128 = match r.resource.as_str() {
            "limits.cpu" => res.cpu_limit_milli.unwrap_or(num_cpus_milli()) as u128,
            "requests.cpu" => res.cpu_request_milli.unwrap_or(0) as u128,
            "limits.memory" => res.memory_limit.unwrap_or(host_memory()) as u128 * 1000,
            "requests.memory" => res.memory_request.unwrap_or(0) as u128 * 1000,
            other => {
                return Err(ctx.err(
                    format!("{field}.valueFrom.resourceFieldRef.resource"),
                    format!("{other:?} is not supported"),
                ))
            }
        };
        return Ok(Some(milli.div_ceil(divisor).to_string()));
    }
    Err(ctx.err(
        format!("{field}.valueFrom"),
        "needs one of configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef",
    ))
}

fn num_cpus_milli() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64 * 1000)
        .unwrap_or(1000)
}

fn host_memory() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total())
        .unwrap_or(0)
}

fn missing_key(kind: &str, name: &str, key: &str, object_exists: bool) -> String {
    if object_exists {
        format!("{kind} {name:?} has no key {key:?}")
    } else {
        format!("{kind} {name:?} not found in the manifest")
    }
}

/// The downward API's field paths.
pub(crate) fn field_ref_value(
    path: &str,
    name: &str,
    namespace: &str,
    uid: &str,
    node: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<String, String> {
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => name.to_string(),
        "metadata.namespace" => namespace.to_string(),
        "metadata.uid" => uid.to_string(),
        "metadata.labels" => format_map(labels),
        "metadata.annotations" => format_map(annotations),
        "spec.nodeName" => node.to_string(),
        "spec.serviceAccountName" => "default".to_string(),
        "status.hostIP" | "status.hostIPs" | "status.podIP" | "status.podIPs" => {
            "127.0.0.1".to_string()
        }
        _ => {
            if let Some(key) = subscript("metadata.labels['") {
                labels.get(&key).cloned().unwrap_or_default()
            } else if let Some(key) = subscript("metadata.annotations['") {
                annotations.get(&key).cloned().unwrap_or_default()
            } else {
                return Err(format!("{path:?} is not a supported field path"));
            }
        }
    })
}

fn field_ref(ctx: &Ctx, path: &str) -> Result<String, String> {
    let meta = &ctx.manifest.pod.metadata;
    field_ref_value(
        path,
        &ctx.pod_name,
        &ctx.namespace,
        &ctx.uid,
        &ctx.node_name,
        &meta.labels.clone().unwrap_or_default(),
        &meta.annotations.clone().unwrap_or_default(),
    )
}

/// `key="value"` lines, sorted, as the downward API writes label files.
pub(crate) fn format_map(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Secret data with `stringData` merged over `data`, as the API server stores it.
fn secret_entries(s: &core::Secret) -> Vec<(String, Vec<u8>)> {
    let mut map: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        map.insert(k.clone(), v.clone().into_bytes());
    }
    map.into_iter().collect()
}

fn config_map_entries(cm: &core::ConfigMap) -> Vec<(String, Vec<u8>)> {
    let mut map: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        map.insert(k.clone(), v.0.clone());
    }
    map.into_iter().collect()
}

fn plan_probe(ctx: &Ctx, p: &core::Probe, field: &str) -> Result<ProbePlan, PlanError> {
    if p.grpc.is_some() {
        return Err(ctx.err(
            format!("{field}.grpc"),
            "gRPC probes are not supported yet (use exec, httpGet or tcpSocket)",
        ));
    }
    let handler = plan_handler(
        ctx,
        p.exec.as_ref(),
        p.http_get.as_ref(),
        p.tcp_socket.as_ref(),
        None,
        field,
    )?;
    let secs = |v: Option<i32>, default: i32, name: &str, min: i32| -> Result<u64, PlanError> {
        let v = v.unwrap_or(default);
        if v < min {
            return Err(ctx.err(format!("{field}.{name}"), format!("must be at least {min}")));
        }
        Ok(v as u64)
    };
    Ok(ProbePlan {
        handler,
        initial_delay: Duration::from_secs(secs(
            p.initial_delay_seconds,
            0,
            "initialDelaySeconds",
            0,
        )?),
        period: Duration::from_secs(secs(p.period_seconds, 10, "periodSeconds", 1)?),
        timeout: Duration::from_secs(secs(p.timeout_seconds, 1, "timeoutSeconds", 1)?),
        success_threshold: secs(p.success_threshold, 1, "successThreshold", 1)? as u32,
        failure_threshold: secs(p.failure_threshold, 3, "failureThreshold", 1)? as u32,
    })
}

fn plan_handler(
    ctx: &Ctx,
    exec: Option<&core::ExecAction>,
    http: Option<&core::HTTPGetAction>,
    tcp: Option<&core::TCPSocketAction>,
    sleep: Option<&core::SleepAction>,
    field: &str,
) -> Result<Handler, PlanError> {
    let count = [
        exec.is_some(),
        http.is_some(),
        tcp.is_some(),
        sleep.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if count != 1 {
        return Err(ctx.err(
            field,
            "needs exactly one of exec, httpGet, tcpSocket (or sleep for hooks)",
        ));
    }
    let port = |p: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
                f: &str|
     -> Result<u16, PlanError> {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        match p {
            IntOrString::Int(n) if (1..=65535).contains(n) => Ok(*n as u16),
            IntOrString::Int(n) => Err(ctx.err(
                format!("{field}.{f}.port"),
                format!("{n} is not a valid port"),
            )),
            IntOrString::String(s) => s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                ctx.err(
                    format!("{field}.{f}.port"),
                    format!("named port {s:?} is not supported; use the number"),
                )
            }),
        }
    };
    if let Some(e) = exec {
        let cmd = e.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err(ctx.err(format!("{field}.exec.command"), "must not be empty"));
        }
        return Ok(Handler::Exec(cmd));
    }
    if let Some(h) = http {
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Err(ctx.err(format!("{field}.httpGet.scheme"), "only HTTP is supported"));
        }
        return Ok(Handler::HttpGet {
            port: port(&h.port, "httpGet")?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            host: h.host.clone(),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        });
    }
    if let Some(t) = tcp {
        return Ok(Handler::TcpSocket {
            port: port(&t.port, "tcpSocket")?,
        });
    }
    let seconds = sleep.map(|s| s.seconds).unwrap_or(0);
    if seconds < 0 {
        return Err(ctx.err(format!("{field}.sleep.seconds"), "must not be negative"));
    }
    Ok(Handler::Sleep(Duration::from_secs(seconds as u64)))
}

fn plan_volumes(ctx: &Ctx, spec: &core::PodSpec) -> Result<Vec<VolumePlan>, PlanError> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{i}]");
        if !is_dns_label(&v.name) {
            return Err(ctx.err(
                format!("{field}.name"),
                format!("{:?} is not a valid DNS label", v.name),
            ));
        }
        if !names.insert(v.name.clone()) {
            return Err(ctx.err(
                format!("{field}.name"),
                format!("duplicate volume name {:?}", v.name),
            ));
        }
        let source = if let Some(e) = &v.empty_dir {
            let memory = match e.medium.as_deref() {
                None | Some("") => false,
                Some("Memory") => true,
                Some(other) => {
                    return Err(ctx.err(
                        format!("{field}.emptyDir.medium"),
                        format!("{other:?} is not supported (use \"\" or Memory)"),
                    ))
                }
            };
            let size_limit = e
                .size_limit
                .as_ref()
                .map(|q| {
                    parse_bytes(&q.0).map_err(|err| {
                        ctx.err(format!("{field}.emptyDir.sizeLimit"), err.to_string())
                    })
                })
                .transpose()?;
            VolumeSource::EmptyDir { memory, size_limit }
        } else if let Some(h) = &v.host_path {
            check_absolute_clean(&h.path)
                .map_err(|msg| ctx.err(format!("{field}.hostPath.path"), msg))?;
            let kind = h.type_.clone().unwrap_or_default();
            if !matches!(
                kind.as_str(),
                "" | "DirectoryOrCreate"
                    | "Directory"
                    | "FileOrCreate"
                    | "File"
                    | "Socket"
                    | "CharDevice"
                    | "BlockDevice"
            ) {
                return Err(ctx.err(
                    format!("{field}.hostPath.type"),
                    format!("{kind:?} is not a hostPath type"),
                ));
            }
            VolumeSource::HostPath {
                path: h.path.clone(),
                kind,
            }
        } else if let Some(c) = &v.config_map {
            let files = match ctx.manifest.config_maps.get(&c.name) {
                Some(cm) => project(
                    ctx,
                    &format!("{field}.configMap"),
                    "configMap",
                    &c.name,
                    config_map_entries(cm),
                    c.items.as_deref(),
                    c.default_mode,
                    c.optional,
                )?,
                None if c.optional == Some(true) => Vec::new(),
                None => {
                    return Err(ctx.err(
                        format!("{field}.configMap.name"),
                        format!("configMap {:?} not found in the manifest", c.name),
                    ))
                }
            };
            VolumeSource::Files(files)
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let files = match ctx.manifest.secrets.get(&name) {
                Some(secret) => project(
                    ctx,
                    &format!("{field}.secret"),
                    "secret",
                    &name,
                    secret_entries(secret),
                    s.items.as_deref(),
                    s.default_mode,
                    s.optional,
                )?,
                None if s.optional == Some(true) => Vec::new(),
                None => {
                    return Err(ctx.err(
                        format!("{field}.secret.secretName"),
                        format!("secret {name:?} not found in the manifest"),
                    ))
                }
            };
            VolumeSource::Files(files)
        } else if let Some(d) = &v.downward_api {
            VolumeSource::Files(downward_files(
                ctx,
                &format!("{field}.downwardAPI"),
                d.items.as_deref().unwrap_or_default(),
                d.default_mode,
            )?)
        } else if let Some(p) = &v.projected {
            let mut files = Vec::new();
            for (j, src) in p.sources.iter().flatten().enumerate() {
                let sfield = format!("{field}.projected.sources[{j}]");
                if let Some(c) = &src.config_map {
                    match ctx.manifest.config_maps.get(&c.name) {
                        Some(cm) => files.extend(project(
                            ctx,
                            &format!("{sfield}.configMap"),
                            "configMap",
                            &c.name,
                            config_map_entries(cm),
                            c.items.as_deref(),
                            p.default_mode,
                            c.optional,
                        )?),
                        None if c.optional == Some(true) => {}
                        None => {
                            return Err(ctx.err(
                                format!("{sfield}.configMap.name"),
                                format!("configMap {:?} not found in the manifest", c.name),
                            ))
                        }
                    }
                } else if let Some(s) = &src.secret {
                    match ctx.manifest.secrets.get(&s.name) {
                        Some(secret) => files.extend(project(
                            ctx,
                            &format!("{sfield}.secret"),
                            "secret",
                            &s.name,
                            secret_entries(secret),
                            s.items.as_deref(),
                            p.default_mode,
                            s.optional,
                        )?),
                        None if s.optional == Some(true) => {}
                        None => {
                            return Err(ctx.err(
                                format!("{sfield}.secret.name"),
                                format!("secret {:?} not found in the manifest", s.name),
                            ))
                        }
                    }
                } else if let Some(d) = &src.downward_api {
                    files.extend(downward_files(
                        ctx,
                        &format!("{sfield}.downwardAPI"),
                        d.items.as_deref().unwrap_or_default(),
                        p.default_mode,
                    )?);
                } else {
                    return Err(ctx.err(
                        sfield,
                        "only configMap, secret and downwardAPI projections are supported",
                    ));
                }
            }
            let mut paths = BTreeSet::new();
            if let Some(dup) = files.iter().find(|f| !paths.insert(f.path.clone())) {
                return Err(ctx.err(
                    format!("{field}.projected"),
                    format!("two sources write {:?}", dup.path),
                ));
            }
            VolumeSource::Files(files)
        } else {
            return Err(ctx.err(field, format!("volume {:?}: only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are supported", v.name)));
        };
        out.push(VolumePlan {
            name: v.name.clone(),
            source,
        });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn project(
    ctx: &Ctx,
    field: &str,
    kind: &str,
    name: &str,
    entries: Vec<(String, Vec<u8>)>,
    items: Option<&[core::KeyToPath]>,
    default_mode: Option<i32>,
    optional: Option<bool>,
) -> Result<Vec<VolumeFile>, PlanError> {
    let default_mode = mode(ctx, field, default_mode, 0o644)?;
    let Some(items) = items else {
        return Ok(entries
            .into_iter()
            .map(|(path, data)| VolumeFile {
                path,
                data,
                mode: default_mode,
            })
            .collect());
    };
    let mut files = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ifield = format!("{field}.items[{i}]");
        check_relative_clean(&item.path).map_err(|msg| ctx.err(format!("{ifield}.path"), msg))?;
        match entries.iter().find(|(k, _)| *k == item.key) {
            Some((_, data)) => files.push(VolumeFile {
                path: item.path.clone(),
                data: data.clone(),
                mode: mode(ctx, &ifield, item.mode, default_mode)?,
            }),
            None if optional == Some(true) => {}
            None => {
                return Err(ctx.err(
                    format!("{ifield}.key"),
                    format!("{kind} {name:?} has no key {:?}", item.key),
                ))
            }
        }
    }
    Ok(files)
}

fn downward_files(
    ctx: &Ctx,
    field: &str,
    items: &[core::DownwardAPIVolumeFile],
    default_mode: Option<i32>,
) -> Result<Vec<VolumeFile>, PlanError> {
    let default_mode = mode(ctx, field, default_mode, 0o644)?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let ifield = format!("{field}.items[{i}]");
            check_relative_clean(&item.path)
                .map_err(|msg| ctx.err(format!("{ifield}.path"), msg))?;
            let value = match (&item.field_ref, &item.resource_field_ref) {
                (Some(f), None) => field_ref(ctx, &f.field_path)
                    .map_err(|msg| ctx.err(format!("{ifield}.fieldRef.fieldPath"), msg))?,
                _ => {
                    return Err(ctx.err(
                        ifield,
                        "needs a fieldRef (resourceFieldRef files are not supported yet)",
                    ))
                }
            };
            Ok(VolumeFile {
                path: item.path.clone(),
                data: value.into_bytes(),
                mode: mode(ctx, &ifield, item.mode, default_mode)?,
            })
        })
        .collect()
}

fn mode(ctx: &Ctx, field: &str, mode: Option<i32>, default: u32) -> Result<u32, PlanError> {
    match mode {
        None => Ok(default),
        Some(m) if (0..=0o777).contains(&m) => Ok(m as u32),
        Some(m) => Err(ctx.err(
            format!("{field}.mode"),
            format!("{m} is not a file mode (0 to 0777)"),
        )),
    }
}

/// Refuses hostPath volumes into vmrun's own state: `protected` are its directories (the pod
/// state root with every pod's records, logs and volumes, the image store). A path is
/// compared with symlinks resolved (as far as it exists: a `DirectoryOrCreate` path may not
/// yet), so a symlink into the state is refused too. A parent of them (`/`, `/run`) is
/// allowed, as Kubernetes allows it: such a pod is given the host, knowingly.
pub fn check_host_paths_outside(plan: &PodPlan, protected: &[&Path]) -> Result<(), PlanError> {
    for (i, v) in plan.volumes.iter().enumerate() {
        let VolumeSource::HostPath { path, .. } = &v.source else {
            continue;
        };
        let resolved = resolve_existing(Path::new(path));
        for dir in protected {
            let dir_resolved = resolve_existing(dir);
            if resolved.starts_with(&dir_resolved) || Path::new(path).starts_with(dir) {
                return Err(PlanError {
                    pod: plan.name.clone(),
                    field: format!("spec.volumes[{i}].hostPath.path"),
                    message: format!(
                        "{path:?} is inside vmrun's state directory {} (a pod may not reach other pods' state or the image store)",
                        dir.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `path` with symlinks resolved in its longest existing prefix, the rest appended.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut prefix = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(prefix) {
            return missing.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (prefix.parent(), prefix.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                prefix = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Absolute, without `..`: what mountPath, workingDir and hostPath must be.
pub fn check_absolute_clean(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must be an absolute path"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} must not contain '..'"));
    }
    Ok(())
}

/// Relative, without `..`: subPath and projected file paths stay inside their volume.
pub fn check_relative_clean(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') {
        return Err(format!("{path:?} must be a non-empty relative path"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} must not contain '..'"));
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse;

    fn plan_of(yaml: &str) -> Result<PodPlan, PlanError> {
        plan(&parse("t.yaml", yaml).unwrap(), "uid-1", "node-1")
    }

    const HEAD: &str =
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n    app: web\nspec:\n";

    #[test]
    fn resolves_env_from_every_source() {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\ndata:\n  color: blue\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  pw: hunter2\n---\n{HEAD}  containers:\n  - name: c\n    image: busybox\n    resources:\n      limits:\n        memory: 64Mi\n    env:\n    - name: A\n      value: x\n    - name: B\n      value: $(A)-y\n    - name: COLOR\n      valueFrom:\n        configMapKeyRef: {{name: cm, key: color}}\n    - name: PW\n      valueFrom:\n        secretKeyRef: {{name: s, key: pw}}\n    - name: POD\n      valueFrom:\n        fieldRef: {{fieldPath: metadata.name}}\n    - name: APP\n      valueFrom:\n        fieldRef: {{fieldPath: \"metadata.labels['app']\"}}\n    - name: MEM\n      valueFrom:\n        resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}\n"
        );
        let p = plan_of(&yaml).unwrap();
        let env: BTreeMap<_, _> = p.containers[0].env.iter().cloned().collect();
        assert_eq!(env["B"], "x-y");
        assert_eq!(env["COLOR"], "blue");
        assert_eq!(env["PW"], "hunter2");
        assert_eq!(env["POD"], "p");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["MEM"], "64");
    }

    #[test]
    fn host_ports_are_collected_and_checked() {
        let with = |ports: &str, host_network: bool| {
            let hn = if host_network {
                "  hostNetwork: true\n"
            } else {
                ""
            };
            plan_of(&format!(
                "{HEAD}{hn}  containers:\n  - name: a\n    image: busybox\n    ports:\n{ports}  - name: b\n    image: busybox\n    ports:\n    - containerPort: 53\n      hostPort: 5353\n      protocol: UDP\n"
            ))
        };
        let p = with(
            "    - containerPort: 80\n      hostPort: 8080\n    - containerPort: 81\n",
            false,
        )
        .unwrap();
        let got: Vec<_> = p
            .host_ports
            .iter()
            .map(|h| {
                (
                    h.host_port,
                    h.container_port,
                    h.protocol.as_str(),
                    h.field.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (8080, 80, "tcp", "spec.containers[0].ports[0]"),
                (5353, 53, "udp", "spec.containers[1].ports[0]"),
            ]
        );
        let err = |ports: &str, hn: bool| with(ports, hn).unwrap_err().to_string();
        let e = err(
            "    - containerPort: 53\n      hostPort: 5353\n      protocol: UDP\n",
            false,
        );
        assert!(
            e.contains("spec.containers[1].ports[0].hostPort")
                && e.contains("already published by spec.containers[0].ports[0]"),
            "{e}"
        );
        // The same number over TCP is another port.
        with("    - containerPort: 53\n      hostPort: 5353\n", false).unwrap();
        let e = err("    - containerPort: 70000\n", false);
        assert!(
            e.contains("ports[0].containerPort") && e.contains("70000"),
            "{e}"
        );
        let e = err("    - containerPort: 80\n      hostPort: -1\n", false);
        assert!(e.contains("ports[0].hostPort"), "{e}");
        let e = err("    - containerPort: 80\n      protocol: QUIC\n", false);
        assert!(e.contains("ports[0].protocol"), "{e}");
        let e = err(
            "    - containerPort: 80\n      hostPort: 8080\n      hostIP: here\n",
            false,
        );
        assert!(e.contains("ports[0].hostIP"), "{e}");
        // hostNetwork: the container binds the host port itself.
        let e = err("    - containerPort: 80\n      hostPort: 8080\n", true);
        assert!(
            e.contains("must equal containerPort 80 with hostNetwork"),
            "{e}"
        );
        let p = plan_of(&format!(
            "{HEAD}  hostNetwork: true\n  containers:\n  - name: a\n    image: busybox\n    ports:\n    - containerPort: 80\n      hostPort: 80\n"
        ))
        .unwrap();
        assert!(p.host_ports.is_empty(), "{:?}", p.host_ports);
    }

    #[test]
    fn missing_config_map_key_names_the_field() {
        let yaml = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\ndata:\n  a: b\n---\n{HEAD}  containers:\n  - name: c\n    image: busybox\n    env:\n    - name: X\n      valueFrom:\n        configMapKeyRef: {{name: cm, key: nope}}\n");
        let err = plan_of(&yaml).unwrap_err().to_string();
        assert!(
            err.contains("spec.containers[0].env[0].valueFrom.configMapKeyRef"),
            "{err}"
        );
        assert!(err.contains("has no key \"nope\""), "{err}");
    }

    #[test]
    fn refuses_bad_mounts_and_volumes() {
        let base = format!("{HEAD}  containers:\n  - name: c\n    image: busybox\n    volumeMounts:\n    - name: v\n      mountPath: MOUNT\n  volumes:\n  - name: v\n    VOLUME\n");
        let case = |mount: &str, volume: &str| {
            plan_of(&base.replace("MOUNT", mount).replace("VOLUME", volume))
                .unwrap_err()
                .to_string()
        };
        assert!(case("relative/dir", "emptyDir: {}").contains("must be an absolute path"));
        assert!(case("/a/../etc", "emptyDir: {}").contains("must not contain '..'"));
        assert!(case("/data", "hostPath: {path: ../etc}").contains("spec.volumes[0].hostPath.path"));
        assert!(case("/data", "nfs: {server: x, path: /}").contains("only emptyDir, hostPath"));
        assert!(
            case("/data", "configMap: {name: missing}").contains("configMap \"missing\" not found")
        );
    }

    #[test]
    fn host_paths_into_the_state_are_refused() {
        let host = tempfile::tempdir().unwrap();
        let state = host.path().join("run-vmrun");
        let store = host.path().join("var-lib-vmrun");
        std::fs::create_dir_all(state.join("pods/other/volumes")).unwrap();
        std::fs::create_dir(&store).unwrap();
        std::os::unix::fs::symlink(state.join("pods"), host.path().join("innocent")).unwrap();
        let with = |path: &Path, kind: &str| {
            let yaml = format!("{HEAD}  containers:\n  - name: c\n    image: busybox\n  volumes:\n  - name: e\n    emptyDir: {{}}\n  - name: h\n    hostPath: {{path: {}, type: \"{kind}\"}}\n", path.display());
            let p = plan_of(&yaml).unwrap();
            check_host_paths_outside(&p, &[&state, &store])
        };
        for (path, kind) in [
            (state.clone(), ""),
            (state.join("pods/other/volumes"), "Directory"),
            (store.join("layers"), "DirectoryOrCreate"),
            (host.path().join("innocent/other"), ""),
            (host.path().join("innocent/new/dir"), "DirectoryOrCreate"),
        ] {
            let err = with(&path, kind).unwrap_err().to_string();
            assert!(
                err.starts_with("pod \"p\": spec.volumes[1].hostPath.path: "),
                "{err}"
            );
            assert!(err.contains("is inside vmrun's state directory"), "{err}");
        }
        // Kubernetes allows the host's / and /proc (and parents of the state, and beside it).
        for path in [
            Path::new("/"),
            Path::new("/proc"),
            host.path(),
            &host.path().join("run-vmrun-not"),
        ] {
            with(path, "").unwrap();
        }
    }

    #[test]
    fn kubernetes_pull_policy_defaults() {
        assert!(image_is_latest("busybox"));
        assert!(image_is_latest("reg:5000/a/b:latest"));
        assert!(!image_is_latest("reg:5000/a/b:1.0"));
        assert!(image_is_latest("reg:5000/a/b"));
        assert!(!image_is_latest("b@sha256:abcd"));
    }

    #[test]
    fn downward_api_and_projected_files() {
        let yaml = format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  k: v\n---\n{HEAD}  containers:\n  - name: c\n    image: busybox\n  volumes:\n  - name: d\n    downwardAPI:\n      items:\n      - path: labels\n        fieldRef: {{fieldPath: metadata.labels}}\n  - name: p\n    projected:\n      sources:\n      - secret:\n          name: s\n          items: [{{key: k, path: sub/key}}]\n      - downwardAPI:\n          items: [{{path: name, fieldRef: {{fieldPath: metadata.name}}}}]\n");
        let p = plan_of(&yaml).unwrap();
        let VolumeSource::Files(d) = &p.volume("d").unwrap().source else {
            panic!()
        };
        assert_eq!(d[0].data, b"app=\"web\"");
        let VolumeSource::Files(files) = &p.volume("p").unwrap().source else {
            panic!()
        };
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, "sub/key");
        assert_eq!(files[1].data, b"p");
    }
}
