/**
 * Shell completion scripts, generated from the command table: commands,
 * each command's flags, the choices of flags that have them, and snapshot
 * names for `rm` / `snapshots rm` (asked of `supermachine snapshots ls`).
 */

import type { CommandSpec } from "./args.js";
import { HELP_OPTION } from "./args.js";
import { COMMANDS } from "./commands.js";

function flags(c: CommandSpec): string[] {
  const out: string[] = [];
  for (const o of [...c.options, HELP_OPTION]) {
    out.push(`--${o.name}`);
    if (o.short) out.push(`-${o.short}`);
  }
  return out;
}

export function completionScript(shell: string): string | undefined {
  const names = COMMANDS.map((c) => c.name);
  if (shell === "bash") {
    const cases = COMMANDS.map((c) => {
      const choices = c.options.filter((o) => o.choices).map((o) => `      --${o.name}) COMPREPLY=($(compgen -W "${o.choices!.join(" ")}" -- "$cur")); return;;`);
      const files = c.options.filter((o) => o.type === "string" && !o.choices).map((o) => `--${o.name}`);
      return `    ${c.name})
      case "$prev" in
${choices.join("\n")}
${files.length ? `      ${files.join("|")}) COMPREPLY=($(compgen -f -- "$cur")); return;;` : ""}
      esac
      if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "${flags(c).join(" ")}" -- "$cur")); return; fi
      ${c.name === "rm" || c.name === "snapshots" ? `COMPREPLY=($(compgen -W "${c.subcommands ? `${c.subcommands.join(" ")} ` : ""}$(supermachine snapshots ls --json 2>/dev/null | sed -n 's/^    "name": "\\(.*\\)",$/\\1/p')" -- "$cur"))` : c.name === "help" ? `COMPREPLY=($(compgen -W "${names.join(" ")}" -- "$cur"))` : c.name === "completion" ? `COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur"))` : ""}
      ;;`;
    });
    return `# supermachine bash completion: source <(supermachine completion bash)
_supermachine() {
  local cur="\${COMP_WORDS[COMP_CWORD]}" prev="\${COMP_WORDS[COMP_CWORD-1]}"
  if [[ $COMP_CWORD -eq 1 ]]; then
    COMPREPLY=($(compgen -W "${names.join(" ")} --help --version" -- "$cur")); return
  fi
  case "\${COMP_WORDS[1]}" in
${cases.join("\n")}
  esac
}
complete -o default -F _supermachine supermachine
`;
  }
  if (shell === "zsh") {
    return `#compdef supermachine
# supermachine zsh completion: source <(supermachine completion zsh)
autoload -U +X bashcompinit && bashcompinit
${completionScript("bash")}`;
  }
  if (shell === "fish") {
    const esc = (s: string) => s.replace(/'/g, "\\'");
    const lines = [`# supermachine fish completion: supermachine completion fish | source`, "complete -c supermachine -f"];
    for (const c of COMMANDS) lines.push(`complete -c supermachine -n '__fish_use_subcommand' -a ${c.name} -d '${esc(c.summary.split(". ")[0]!.slice(0, 80))}'`);
    for (const c of COMMANDS) {
      for (const o of [...c.options, HELP_OPTION]) {
        let l = `complete -c supermachine -n '__fish_seen_subcommand_from ${c.name}' -l ${o.name}`;
        if (o.short) l += ` -s ${o.short}`;
        if (o.type === "string") l += o.choices ? ` -x -a '${o.choices.join(" ")}'` : " -r -F";
        l += ` -d '${esc(o.help.slice(0, 80))}'`;
        lines.push(l);
      }
    }
    lines.push(`complete -c supermachine -n '__fish_seen_subcommand_from completion' -a 'bash zsh fish'`);
    lines.push(`complete -c supermachine -n '__fish_seen_subcommand_from help' -a '${names.join(" ")}'`);
    lines.push(`complete -c supermachine -n '__fish_seen_subcommand_from snapshots' -a 'ls rm'`);
    return lines.join("\n") + "\n";
  }
  return undefined;
}
