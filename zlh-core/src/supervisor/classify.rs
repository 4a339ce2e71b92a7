//! Crash classification: rules are data (patterns over the log tail + exit status), with
//! defaults for Java/Minecraft, Node and Python.
//!
//! Rules are data so that operators can override them (JSON or TOML through serde) without a new
//! release: a new mod loader's error text is a config change, not a code change. The defaults
//! live in [`Classifier::default_rules`]; the first matching rule wins, so specific rules come
//! before general ones. Regexes are compiled once, in [`Classifier::new`].
//!
//! Players can write into the output (chat, commands they run), so lines they can write never
//! decide a class: they match [`Classifier::player_patterns`] (Minecraft's chat and command lines
//! by default; a game's catalog entry may add its own chat pattern) and are left out. The runtimes'
//! out-of-memory texts only count on stderr, where the runtime prints them and a game's chat never
//! goes, and only at the start of a line. ANSI escapes (colours) are
//! removed before matching, so they can neither hide a chat prefix nor split an error text.

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

use super::CrashClass;

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// True when the kernel's memory limit was hit during the run (cgroup `memory.events` oom_kill,
    /// or a SIGKILL while a limit was set and usage was at it).
    pub memory_limit_hit: bool,
}

/// One rule: it matches when every given condition holds (empty lists match anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub class: CrashClass,
    /// Regexes; the rule matches if any of them matches any line of the tail.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Regexes that must each match some line of the tail as well (an error that counts as a
    /// mod error only when the tail also mentions mods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_patterns: Vec<String>,
    #[serde(default)]
    pub exit_codes: Vec<i32>,
    #[serde(default)]
    pub signals: Vec<i32>,
    /// Only matches when `ExitInfo::memory_limit_hit`.
    #[serde(default)]
    pub requires_memory_limit_hit: bool,
    /// The patterns look only at lines the process wrote to stderr.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stderr_only: bool,
}

impl Rule {
    /// A rule that matches when any of `patterns` matches a line of the tail.
    pub fn patterns(class: CrashClass, patterns: &[&str]) -> Self {
        Self {
            class,
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            also_patterns: Vec::new(),
            exit_codes: Vec::new(),
            signals: Vec::new(),
            requires_memory_limit_hit: false,
            stderr_only: false,
        }
    }

    /// A rule that matches when any of `patterns` matches a line the process wrote to stderr.
    pub fn stderr_patterns(class: CrashClass, patterns: &[&str]) -> Self {
        Self { stderr_only: true, ..Self::patterns(class, patterns) }
    }
}

/// What a run wrote before it ended: its last lines as they came (stdout and stderr together),
/// and its last lines on stderr alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOutput<'a> {
    pub tail: &'a [String],
    pub stderr: &'a [String],
}

/// A rule with its regexes compiled.
#[derive(Debug, Clone)]
struct Compiled {
    rule: Rule,
    any: Option<RegexSet>,
    all: Vec<Regex>,
}

impl Compiled {
    fn matches(&self, exit: &ExitInfo, output: &RunOutput<'_>) -> bool {
        let rule = &self.rule;
        let tail = if rule.stderr_only { output.stderr } else { output.tail };
        let listed = |list: &[i32], value: Option<i32>| list.is_empty() || value.is_some_and(|v| list.contains(&v));
        // Cheap conditions first; the tail is scanned only when they hold.
        (!rule.requires_memory_limit_hit || exit.memory_limit_hit)
            && listed(&rule.exit_codes, exit.code)
            && listed(&rule.signals, exit.signal)
            && self.any.as_ref().is_none_or(|set| tail.iter().any(|l| set.is_match(l)))
            && self.all.iter().all(|re| tail.iter().any(|l| re.is_match(l)))
    }
}

/// Ordered rules; the first match wins. Falls back to `unexpected_exit` for exit 0 and
/// `nonzero_exit` otherwise.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Compiled>,
    player_patterns: Vec<String>,
    player_lines: RegexSet,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid classification rule {index}: {message}")]
pub struct RuleError {
    pub index: usize,
    pub message: String,
}

/// A Minecraft log line's prefix: vanilla/Forge/Fabric `[12:00:00] [Server thread/INFO]: ` or
/// Paper/Spigot `[12:00:00 INFO]: `, or none.
const MINECRAFT_PREFIX: &str = r"^(?:\[\d{1,2}:\d{2}:\d{2}\] \[[^\]]+\]: |\[\d{1,2}:\d{2}:\d{2} [A-Z]+\]: )?";

/// Lines a Minecraft player writes: chat (`<name> …`, unsigned `[Not Secure] <name> …`),
/// `/say` as the console (`[Server] …`) and the commands players run (Bukkit logs them).
pub fn minecraft_player_patterns() -> Vec<String> {
    vec![
        format!(r"{MINECRAFT_PREFIX}(?:\[Not Secure\] )?(?:<[^>]*>|\[Server\]) "),
        format!(r"{MINECRAFT_PREFIX}\S+ issued server command: "),
    ]
}

/// Removes ANSI escape sequences (colours, cursor moves) from a line of output.
pub fn strip_ansi(line: &str) -> String {
    if !line.contains('\x1b') && !line.contains('\u{9b}') {
        return line.to_string();
    }
    String::from_utf8_lossy(&strip_ansi_escapes::strip(line)).into_owned()
}

/// Tail text that names mods or plugins (paths, loader packages, mod ids).
const MOD_MENTION: &str = r"(?i)(\b(mods|plugins)/|\bmod ?(file|id)s?\b|\bplugin\b|-- mod |mixin|\bfml\b|fabricmc|neoforged|minecraftforge|org\.bukkit\.plugin)";

impl Classifier {
    /// The rules, with Minecraft's chat and command lines as the lines players write.
    pub fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        let compiled = rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                let err = |e: regex::Error| RuleError { index, message: e.to_string() };
                let any =
                    if rule.patterns.is_empty() { None } else { Some(RegexSet::new(&rule.patterns).map_err(err)?) };
                let all = rule.also_patterns.iter().map(|p| Regex::new(p)).collect::<Result<_, _>>().map_err(err)?;
                Ok(Compiled { rule, any, all })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let count = compiled.len();
        Self { rules: compiled, player_patterns: Vec::new(), player_lines: RegexSet::empty() }
            .with_player_patterns(minecraft_player_patterns())
            .map_err(|e| RuleError { index: count + e.index, ..e })
    }

    /// Adds patterns of lines players can write (a game's own chat format); such lines never
    /// decide a class. An invalid regex is refused (`index` counts after the rules).
    pub fn with_player_patterns(mut self, patterns: impl IntoIterator<Item = String>) -> Result<Self, RuleError> {
        let before = self.player_patterns.len();
        self.player_patterns.extend(patterns);
        match RegexSet::new(&self.player_patterns) {
            Ok(set) => {
                self.player_lines = set;
                Ok(self)
            }
            Err(e) => {
                let bad = (before..self.player_patterns.len())
                    .find(|&i| Regex::new(&self.player_patterns[i]).is_err())
                    .unwrap_or(before);
                Err(RuleError { index: self.rules.len() + bad, message: e.to_string() })
            }
        }
    }

    /// Patterns of lines players can write.
    pub fn player_patterns(&self) -> &[String] {
        &self.player_patterns
    }

    /// The rules as given (for showing or editing them).
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|c| &c.rule)
    }

    pub fn default_rules() -> Vec<Rule> {
        use CrashClass::{MissingDependency, ModOrPluginError, Oom};
        const SIGKILL: i32 = 9;
        let memory_limit = |mut rule: Rule| {
            rule.requires_memory_limit_hit = true;
            rule
        };
        vec![
            // Out of memory: the runtimes' own messages (on stderr, at the start of a line, where
            // the runtime prints them), then the kernel's kill at the limit.
            Rule::stderr_patterns(
                Oom,
                &[
                    r#"^\s*(Exception in thread "[^"]*" |Caused by: |Terminating due to )?java\.lang\.OutOfMemoryError\b"#,
                    r"^# There is insufficient memory for the Java Runtime Environment",
                ],
            ),
            Rule::stderr_patterns(Oom, &[r"^(Fatal Python error: )?Out of memory\b", r"^\s*MemoryError\b"]),
            Rule::stderr_patterns(Oom, &[r"^FATAL ERROR: .*(JavaScript heap out of memory|Reached heap limit)"]),
            memory_limit(Rule { signals: vec![SIGKILL], ..Rule::patterns(Oom, &[]) }),
            memory_limit(Rule { exit_codes: vec![137], ..Rule::patterns(Oom, &[]) }),
            // Something the program needs is not there.
            Rule::patterns(
                MissingDependency,
                &[r"error while loading shared libraries", r"cannot open shared object file"],
            ),
            Rule::patterns(MissingDependency, &[r"Error: Cannot find module\b"]),
            Rule::patterns(MissingDependency, &[r"\bModuleNotFoundError\b", r"ImportError: No module named"]),
            Rule::patterns(MissingDependency, &[r"\bcommand not found\b"]),
            Rule { exit_codes: vec![127], ..Rule::patterns(MissingDependency, &[r"No such file or directory"]) },
            Rule::patterns(MissingDependency, &[r"Unable to access jarfile"]),
            // The class file is newer than the Java runtime: wrong Java version.
            Rule::patterns(MissingDependency, &[r"\bUnsupportedClassVersionError\b"]),
            Rule::patterns(MissingDependency, &[r"Error: Could not find or load main class"]),
            // Mod loaders (Forge, NeoForge, Fabric, Mixin) and plugin loaders (Bukkit family).
            Rule::patterns(
                ModOrPluginError,
                &[
                    r"Could not load '[^']*' in folder '",
                    r"Error occurred while enabling ",
                    r"Failed to load plugin",
                    r"org\.bukkit\.plugin\.(InvalidPluginException|UnknownDependencyException)",
                    r"net\.(minecraftforge|neoforged)\.fml\.\S*(LoaderException|LoadingFailedException)",
                    r"\bModLoadingException\b",
                    r"Mod resolution failed",
                    r"(?i)\bincompatible mods? (found|set)\b",
                    r"Some of your mods are incompatible",
                    r"Mixin apply (for mod \S+ )?failed",
                    r"\bMixin(Apply|Transformer)Error\b",
                    r"Could not execute entrypoint stage '[^']*' due to errors",
                ],
            ),
            Rule {
                also_patterns: vec![MOD_MENTION.into()],
                ..Rule::patterns(ModOrPluginError, &[r"Encountered an unexpected exception"])
            },
            // A missing class: a mod's or plugin's when the tail names one, else the program's.
            Rule {
                also_patterns: vec![MOD_MENTION.into()],
                ..Rule::patterns(ModOrPluginError, &[r"\b(ClassNotFoundException|NoClassDefFoundError)\b"])
            },
            Rule::patterns(MissingDependency, &[r"\b(ClassNotFoundException|NoClassDefFoundError)\b"]),
        ]
    }

    /// The class of an exit, from the run's last output lines (ANSI escapes and lines players
    /// can write are left out first).
    pub fn classify(&self, exit: &ExitInfo, output: RunOutput<'_>) -> CrashClass {
        let clean = |lines: &[String]| -> Vec<String> {
            lines.iter().map(|l| strip_ansi(l)).filter(|l| !self.player_lines.is_match(l)).collect()
        };
        let (tail, stderr) = (clean(output.tail), clean(output.stderr));
        let output = RunOutput { tail: &tail, stderr: &stderr };
        if let Some(rule) = self.rules.iter().find(|c| c.matches(exit, &output)) {
            return rule.rule.class;
        }
        if exit.code == Some(0) && exit.signal.is_none() {
            CrashClass::UnexpectedExit
        } else {
            CrashClass::NonzeroExit
        }
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new(Self::default_rules()).expect("default rules are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CrashClass::*;

    fn code(c: i32) -> ExitInfo {
        ExitInfo { code: Some(c), signal: None, memory_limit_hit: false }
    }

    fn signal(s: i32, memory_limit_hit: bool) -> ExitInfo {
        ExitInfo { code: None, signal: Some(s), memory_limit_hit }
    }

    fn tail(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    /// Lines as a run wrote them on stderr (where every rule looks).
    fn out(lines: &[String]) -> RunOutput<'_> {
        RunOutput { tail: lines, stderr: lines }
    }

    fn class(exit: ExitInfo, text: &str) -> CrashClass {
        Classifier::default().classify(&exit, out(&tail(text)))
    }

    // --- Out of memory ---

    #[test]
    fn java_heap_space_is_oom() {
        let t = "[12:01:02] [Server thread/INFO]: Saving chunks for level 'world'/minecraft:overworld\n\
                 Exception in thread \"Server thread\" java.lang.OutOfMemoryError: Java heap space\n\
                 \tat java.base/java.util.Arrays.copyOf(Arrays.java:3537)";
        assert_eq!(class(code(1), t), Oom);
    }

    #[test]
    fn jvm_native_allocation_failure_is_oom() {
        let t = "# There is insufficient memory for the Java Runtime Environment to continue.\n\
                 # Native memory allocation (mmap) failed to map 2147483648 bytes for committing reserved memory.";
        assert_eq!(class(code(1), t), Oom);
    }

    #[test]
    fn python_memory_error_is_oom() {
        let t = "Traceback (most recent call last):\n  File \"/srv/app/main.py\", line 3, in <module>\n    data = [0] * (10 ** 12)\nMemoryError";
        assert_eq!(class(code(1), t), Oom);
        let t = "numpy.core._exceptions._ArrayMemoryError: Unable to allocate 7.45 GiB\nMemoryError: Unable to allocate 7.45 GiB for an array with shape (1000000000,) and data type float64";
        assert_eq!(class(code(1), t), Oom);
    }

    #[test]
    fn out_of_memory_text_is_oom() {
        assert_eq!(class(code(1), "Fatal Python error: Out of memory"), Oom);
    }

    #[test]
    fn node_heap_limit_is_oom() {
        let t = "<--- Last few GCs --->\n\
                 [4242:0x5f1c2a0]    61234 ms: Mark-Compact 2046.9 (2081.3) -> 2045.8 (2082.3) MB\n\
                 FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory";
        assert_eq!(class(signal(6, false), t), Oom);
        let old = "FATAL ERROR: CALL_AND_RETRY_LAST Allocation failed - JavaScript heap out of memory";
        assert_eq!(class(signal(6, false), old), Oom);
    }

    #[test]
    fn sigkill_at_the_memory_limit_is_oom() {
        assert_eq!(class(signal(9, true), "[Server thread/INFO]: Done"), Oom);
        // A SIGKILL without the limit hit is someone else's kill.
        assert_eq!(class(signal(9, false), "[Server thread/INFO]: Done"), NonzeroExit);
    }

    #[test]
    fn exit_137_at_the_memory_limit_is_oom() {
        let mut exit = code(137);
        assert_eq!(class(exit, ""), NonzeroExit);
        exit.memory_limit_hit = true;
        assert_eq!(class(exit, ""), Oom);
    }

    // --- Missing dependencies ---

    #[test]
    fn missing_shared_library() {
        let t = "./bedrock_server: error while loading shared libraries: libssl.so.1.1: cannot open shared object file: No such file or directory";
        assert_eq!(class(code(127), t), MissingDependency);
        let t = "ImportError: libGL.so.1: cannot open shared object file: No such file or directory";
        assert_eq!(class(code(1), t), MissingDependency);
    }

    #[test]
    fn node_cannot_find_module() {
        let t = "node:internal/modules/cjs/loader:1228\n  throw err;\n  ^\n\n\
                 Error: Cannot find module 'express'\nRequire stack:\n- /home/dev/workspace/server.js";
        assert_eq!(class(code(1), t), MissingDependency);
    }

    #[test]
    fn python_module_not_found() {
        let t = "Traceback (most recent call last):\n  File \"/srv/app/app.py\", line 1, in <module>\n    import flask\nModuleNotFoundError: No module named 'flask'";
        assert_eq!(class(code(1), t), MissingDependency);
        assert_eq!(class(code(1), "ImportError: No module named flask"), MissingDependency);
    }

    #[test]
    fn shell_command_not_found() {
        assert_eq!(class(code(127), "/srv/start.sh: line 3: java: command not found"), MissingDependency);
    }

    #[test]
    fn exec_no_such_file_needs_exit_127() {
        let t = "/srv/start.sh: line 2: /opt/java/21/bin/java: No such file or directory";
        assert_eq!(class(code(127), t), MissingDependency);
        // The same words from a program that ran and failed are not a missing program.
        let t = "java.io.FileNotFoundException: world/level.dat (No such file or directory)";
        assert_eq!(class(code(1), t), NonzeroExit);
    }

    #[test]
    fn java_unable_to_access_jarfile() {
        assert_eq!(class(code(1), "Error: Unable to access jarfile server.jar"), MissingDependency);
    }

    #[test]
    fn java_too_old_for_the_class_files() {
        let t = "Error: LinkageError occurred while loading main class net.minecraft.bundler.Main\n\
                 \tjava.lang.UnsupportedClassVersionError: net/minecraft/bundler/Main has been compiled by a more recent version of the Java Runtime (class file version 65.0), this version of the Java Runtime only recognizes class file versions up to 61.0";
        assert_eq!(class(code(1), t), MissingDependency);
    }

    #[test]
    fn java_main_class_not_found() {
        let t = "Error: Could not find or load main class net.minecraft.server.Main\n\
                 Caused by: java.lang.ClassNotFoundException: net.minecraft.server.Main";
        assert_eq!(class(code(1), t), MissingDependency);
    }

    // --- Mods and plugins ---

    #[test]
    fn bukkit_plugin_could_not_load() {
        let t = "[12:00:01 ERROR]: Could not load 'plugins/EssentialsX-2.20.1.jar' in folder 'plugins'\n\
                 org.bukkit.plugin.UnknownDependencyException: Unknown/missing dependency plugins: [Vault]. Please download and install these plugins to run 'Essentials'.";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn bukkit_error_while_enabling() {
        let t = "[12:00:03 ERROR]: Error occurred while enabling WorldEdit v7.3.0+6678-4a5e2a5 (Is it up to date?)\n\
                 java.lang.IllegalStateException: zip file closed";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn failed_to_load_plugin() {
        let t = "[12:00:01 ERROR]: [PluginRemapper] Failed to load plugin 'LuckPerms' from plugins/LuckPerms-Bukkit-5.4.jar";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn forge_loader_exceptions() {
        let t = "net.minecraftforge.fml.common.LoaderException: java.lang.NoClassDefFoundError: net/minecraft/client/multiplayer/WorldClient";
        assert_eq!(class(code(1), t), ModOrPluginError);
        let t = "[main/FATAL] [net.minecraftforge.server.loading.ServerModLoader/LOADING]: Crash\n\
                 net.minecraftforge.fml.LoadingFailedException: Loading errors encountered: [\n\tJade (jade) has failed to load correctly";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn forge_mod_loading_exception() {
        let t = "Caused by: net.neoforged.fml.ModLoadingException: Create (create) has failed to load correctly\n\
                 \tjava.lang.NullPointerException: Cannot invoke \"Object.getClass()\" because \"x\" is null";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn fabric_resolution_failures() {
        let t = "[main/ERROR]: Incompatible mods found!\n\
                 net.fabricmc.loader.impl.FormattedException: Some of your mods are incompatible with the game or each other!";
        assert_eq!(class(code(1), t), ModOrPluginError);
        let t = "net.fabricmc.loader.discovery.ModResolutionException: Mod resolution failed";
        assert_eq!(class(code(1), t), ModOrPluginError);
        let t = "net.fabricmc.loader.impl.FormattedException: Mod resolution encountered an incompatible mod set!";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn mixin_apply_failed() {
        let t = "org.spongepowered.asm.mixin.transformer.throwables.MixinTransformerError: An unexpected critical error was encountered\n\
                 Caused by: org.spongepowered.asm.mixin.throwables.MixinApplyError: Mixin [lithium.mixins.json:ai.MobEntityMixin] from phase [DEFAULT] in config [lithium.mixins.json] FAILED during APPLY";
        assert_eq!(class(code(1), t), ModOrPluginError);
        let t = "[main/ERROR]: Mixin apply for mod sodium failed sodium.mixins.json:core.MinecraftClientMixin from mod sodium -> net.minecraft.class_310";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn fabric_entrypoint_failure() {
        let t = "java.lang.RuntimeException: Could not execute entrypoint stage 'main' due to errors, provided by 'carpet'!";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn unexpected_exception_with_mod_frames() {
        let t = "[Server thread/ERROR]: Encountered an unexpected exception\n\
                 java.lang.NullPointerException: Cannot invoke \"net.minecraft.world.level.Level.getBlockState\" because \"level\" is null\n\
                 \tat com.simibubi.create.content.kinetics.base.KineticBlockEntity.tick(KineticBlockEntity.java:96) ~[create-1.20.1-0.5.1.f.jar%23201!/:0.5.1.f] {re:mixin,re:classloading,pl:mixin:APP:create.mixins.json:accessor.LevelAccessor,pl:mixin:A}";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn unexpected_exception_in_vanilla_is_plain_nonzero() {
        let t = "[Server thread/ERROR]: Encountered an unexpected exception\n\
                 net.minecraft.ReportedException: Ticking entity\n\
                 \tat net.minecraft.server.MinecraftServer.tickChildren(MinecraftServer.java:1720)\n\
                 \tIs Modded: Probably not. Server jar signature and brand is untouched";
        assert_eq!(class(code(1), t), NonzeroExit);
    }

    #[test]
    fn missing_class_named_by_a_mod_is_a_mod_error() {
        let t = "Caused by: java.lang.ClassNotFoundException: software.bernie.geckolib3.core.IAnimatable\n\
                 \tMod File: /srv/minecraft/mods/alexsmobs-1.22.8.jar";
        assert_eq!(class(code(1), t), ModOrPluginError);
    }

    #[test]
    fn missing_class_elsewhere_is_a_missing_dependency() {
        let t = "Exception in thread \"main\" java.lang.NoClassDefFoundError: org/slf4j/LoggerFactory\n\
                 Caused by: java.lang.ClassNotFoundException: org.slf4j.LoggerFactory\n\
                 \tat java.base/jdk.internal.loader.BuiltinClassLoader.loadClass(BuiltinClassLoader.java:641)";
        assert_eq!(class(code(1), t), MissingDependency);
    }

    // --- Lines players write ---

    #[test]
    fn chat_never_decides_a_class() {
        let oom = "java.lang.OutOfMemoryError: Java heap space";
        for chat in [
            format!("[12:00:00] [Server thread/INFO]: <bot> {oom}"),
            format!("[12:00:00] [Async Chat Thread - #3/INFO]: [Not Secure] <bot> {oom}"),
            format!("[12:00:00 INFO]: <bot> {oom}"),
            format!("<bot> {oom}"),
            format!("[Server] {oom}"),
            format!("[12:00:00] [Server thread/INFO]: [Server] {oom}"),
            format!("[12:00:00 INFO]: bot issued server command: /msg admin {oom}"),
            "[12:00:00] [Server thread/INFO]: <bot> Error: Cannot find module 'x'".to_string(),
            "[12:00:00] [Server thread/INFO]: <bot> Could not load 'plugins/x.jar' in folder 'plugins'".to_string(),
        ] {
            assert_eq!(class(code(1), &chat), NonzeroExit, "{chat}");
            assert_eq!(class(code(0), &chat), UnexpectedExit, "{chat}");
        }
    }

    #[test]
    fn runtime_oom_text_counts_only_where_the_runtime_prints_it() {
        // Mid-line, after someone else's prefix, it is text, not the runtime's error.
        assert_eq!(class(code(1), "[12:00:00] [Server thread/INFO]: bot said java.lang.OutOfMemoryError"), NonzeroExit);
        assert_eq!(class(code(1), "[12:00:00] [Server thread/INFO]: Out of memory? no"), NonzeroExit);
        // The JVM's own forms.
        assert_eq!(class(code(1), "java.lang.OutOfMemoryError: Java heap space"), Oom);
        assert_eq!(class(code(1), "Caused by: java.lang.OutOfMemoryError: Metaspace"), Oom);
        assert_eq!(class(code(3), "Terminating due to java.lang.OutOfMemoryError: Java heap space"), Oom);
    }

    #[test]
    fn runtime_oom_text_counts_only_on_stderr() {
        // A server that logs a player's words on stdout, even at the start of a line.
        let said = tail("java.lang.OutOfMemoryError: Java heap space\nMemoryError\nFATAL ERROR: Reached heap limit");
        let on_stdout = RunOutput { tail: &said, stderr: &[] };
        assert_eq!(Classifier::default().classify(&code(1), on_stdout), NonzeroExit);
        let on_stderr = RunOutput { tail: &said, stderr: &said[..1] };
        assert_eq!(Classifier::default().classify(&code(1), on_stderr), Oom);
        // Other rules read the whole tail.
        let missing = tail("Error: Cannot find module 'express'");
        assert_eq!(
            Classifier::default().classify(&code(1), RunOutput { tail: &missing, stderr: &[] }),
            MissingDependency
        );
    }

    #[test]
    fn ansi_escapes_neither_hide_chat_nor_split_errors() {
        let chat = "\x1b[0;37m[12:00:00 INFO]: \x1b[0m<bot> \x1b[31mjava.lang.OutOfMemoryError\x1b[0m";
        assert_eq!(class(code(1), chat), NonzeroExit);
        let error = "\x1b[31mError: Cannot find module 'express'\x1b[0m";
        assert_eq!(class(code(1), error), MissingDependency);
        assert_eq!(strip_ansi("\x1b[1;31mred\x1b[0m plain"), "red plain");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn a_game_can_name_its_own_chat_pattern() {
        let c = Classifier::default().with_player_patterns([r"^\[CHAT\] ".to_string()]).unwrap();
        let line = tail("[CHAT] Steve: Error: Unable to access jarfile server.jar");
        assert_eq!(c.classify(&code(1), out(&line)), NonzeroExit);
        assert_eq!(Classifier::default().classify(&code(1), out(&line)), MissingDependency);
        // Minecraft's patterns stay.
        assert_eq!(c.classify(&code(1), out(&tail("<bot> java.lang.OutOfMemoryError"))), NonzeroExit);
        let err = Classifier::default().with_player_patterns(["(".to_string()]).unwrap_err();
        assert!(err.to_string().contains("invalid classification rule"), "{err}");
    }

    // --- Order, fallbacks, data ---

    #[test]
    fn default_order_puts_oom_first() {
        // An OOM inside a mod's frame is still an OOM.
        let t = "java.lang.OutOfMemoryError: Java heap space\n\tMod File: /srv/minecraft/mods/create.jar";
        assert_eq!(class(code(1), t), Oom);
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = vec![Rule::patterns(MissingDependency, &["boom"]), Rule::patterns(Oom, &["boom"])];
        let c = Classifier::new(rules.clone()).unwrap();
        assert_eq!(c.classify(&code(1), out(&tail("boom"))), MissingDependency);
        let c = Classifier::new(rules.into_iter().rev().collect()).unwrap();
        assert_eq!(c.classify(&code(1), out(&tail("boom"))), Oom);
    }

    #[test]
    fn every_condition_must_hold() {
        let rule = Rule {
            exit_codes: vec![3],
            signals: vec![],
            also_patterns: vec!["second".into()],
            ..Rule::patterns(Oom, &["first"])
        };
        let c = Classifier::new(vec![rule]).unwrap();
        assert_eq!(c.classify(&code(3), out(&tail("first\nsecond"))), Oom);
        assert_eq!(c.classify(&code(4), out(&tail("first\nsecond"))), NonzeroExit);
        assert_eq!(c.classify(&code(3), out(&tail("first"))), NonzeroExit);
        assert_eq!(c.classify(&code(3), out(&tail("second"))), NonzeroExit);
        // A listed exit code never matches a death by signal.
        assert_eq!(c.classify(&signal(3, false), out(&tail("first\nsecond"))), NonzeroExit);
    }

    #[test]
    fn fallbacks() {
        let c = Classifier::new(vec![]).unwrap();
        assert_eq!(c.classify(&code(0), RunOutput::default()), UnexpectedExit);
        assert_eq!(c.classify(&code(1), RunOutput::default()), NonzeroExit);
        assert_eq!(c.classify(&signal(15, false), RunOutput::default()), NonzeroExit);
        let odd = ExitInfo { code: Some(0), signal: Some(15), memory_limit_hit: false };
        assert_eq!(c.classify(&odd, RunOutput::default()), NonzeroExit);
        let d = Classifier::default();
        assert_eq!(d.classify(&code(0), out(&tail("[Server thread/INFO]: Stopping server"))), UnexpectedExit);
        assert_eq!(d.classify(&code(1), out(&tail(""))), NonzeroExit);
    }

    #[test]
    fn custom_rules_from_json() {
        let json = r#"[
            {"class": "oom", "patterns": ["GC overhead limit exceeded"]},
            {"class": "missing_dependency", "exit_codes": [126]},
            {"class": "oom", "signals": [9], "requires_memory_limit_hit": true}
        ]"#;
        let rules: Vec<Rule> = serde_json::from_str(json).unwrap();
        let c = Classifier::new(rules).unwrap();
        assert_eq!(c.classify(&code(1), out(&tail("java.lang.OutOfMemoryError: GC overhead limit exceeded"))), Oom);
        assert_eq!(c.classify(&code(126), RunOutput::default()), MissingDependency);
        assert_eq!(c.classify(&signal(9, true), RunOutput::default()), Oom);
        assert_eq!(c.classify(&signal(9, false), RunOutput::default()), NonzeroExit);
    }

    #[test]
    fn default_rules_round_trip_through_json() {
        let rules = Classifier::default_rules();
        let json = serde_json::to_string(&rules).unwrap();
        let back: Vec<Rule> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rules);
        assert_eq!(Classifier::default().rules().count(), rules.len());
    }

    #[test]
    fn invalid_regex_is_refused_with_its_index() {
        let rules = vec![Rule::patterns(Oom, &["fine"]), Rule::patterns(Oom, &["also fine", "(unclosed"])];
        let err = Classifier::new(rules).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.to_string().starts_with("invalid classification rule 1: "), "{err}");
        let rule = Rule { also_patterns: vec!["[".into()], ..Rule::patterns(Oom, &[]) };
        assert_eq!(Classifier::new(vec![rule]).unwrap_err().index, 0);
    }
}
