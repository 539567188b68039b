//! What a container runs: Kubernetes `command`/`args` combined with the image's
//! Entrypoint/Cmd, and `$(VAR)` expansion.

/// Kubernetes' rules: `command` replaces Entrypoint and drops Cmd; `args` alone
/// replaces Cmd and keeps Entrypoint; neither runs Entrypoint + Cmd.
pub fn resolve_argv(
    command: Option<&[String]>,
    args: Option<&[String]>,
    image_entrypoint: &[String],
    image_cmd: &[String],
    env: &[(String, String)],
) -> Vec<String> {
    let expand_all = |list: &[String]| list.iter().map(|s| expand(s, env)).collect::<Vec<_>>();
    match (command, args) {
        (Some(command), Some(args)) => [expand_all(command), expand_all(args)].concat(),
        (Some(command), None) => expand_all(command),
        (None, Some(args)) => [image_entrypoint.to_vec(), expand_all(args)].concat(),
        (None, None) => [image_entrypoint, image_cmd].concat(),
    }
}

/// Expands `$(NAME)` from `env` (later entries win); `$$` escapes to `$`; unknown
/// references stay as written, exactly as the kubelet does.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kubernetes_command_rules() {
        let ep = v(&["/entry"]);
        let cmd = v(&["--default"]);
        let env = vec![("X".to_string(), "1".to_string())];
        assert_eq!(
            resolve_argv(None, None, &ep, &cmd, &env),
            v(&["/entry", "--default"])
        );
        assert_eq!(
            resolve_argv(None, Some(&v(&["a$(X)"])), &ep, &cmd, &env),
            v(&["/entry", "a1"])
        );
        assert_eq!(
            resolve_argv(Some(&v(&["sh"])), None, &ep, &cmd, &env),
            v(&["sh"])
        );
        assert_eq!(
            resolve_argv(Some(&v(&["sh"])), Some(&v(&["-c"])), &ep, &cmd, &env),
            v(&["sh", "-c"])
        );
    }

    #[test]
    fn expansion_like_the_kubelet() {
        let env = vec![
            ("A".to_string(), "x".to_string()),
            ("A".to_string(), "y".to_string()),
        ];
        assert_eq!(expand("$(A)", &env), "y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B) $A $(", &env), "$(B) $A $(");
        assert_eq!(expand("cost: $5", &env), "cost: $5");
    }
}
