"""The node ids of ComfyUI's core (``nodes.py``, ``comfy_extras``, ``comfy_api_nodes``) in version 0.3.64.

The queue client uses them to tell, for a node type the server lacks, a core node (update ComfyUI)
from a custom-node pack's (install that pack).  Generated from ComfyUI 0.3.64: the ids its server
lists with a core ``python_module`` plus those its source declares (the audio nodes need
``torchaudio`` to load); ``tests/comfy/test_queue_client.py`` checks the list against a running
ComfyUI and the shipped workflows.
"""

from __future__ import annotations

CORE_VERSION = "0.3.64"
CORE_NODE_TYPES: frozenset[str] = frozenset("""
    APG AddNoise AlignYourStepsScheduler AudioAdjustVolume AudioConcat AudioEncoderEncode AudioEncoderLoader
    AudioMerge BasicGuider BasicScheduler BetaSamplingScheduler ByteDanceFirstLastFrameNode ByteDanceImageEditNode
    ByteDanceImageNode ByteDanceImageReferenceNode ByteDanceImageToVideoNode ByteDanceSeedreamNode
    ByteDanceTextToVideoNode CFGGuider CFGNorm CFGZeroStar CLIPAttentionMultiply CLIPLoader CLIPMergeAdd
    CLIPMergeSimple CLIPMergeSubtract CLIPSave CLIPSetLastLayer CLIPTextEncode CLIPTextEncodeControlnet
    CLIPTextEncodeFlux CLIPTextEncodeHiDream CLIPTextEncodeHunyuanDiT CLIPTextEncodeLumina2
    CLIPTextEncodePixArtAlpha CLIPTextEncodeSD3 CLIPTextEncodeSDXL CLIPTextEncodeSDXLRefiner CLIPVisionEncode
    CLIPVisionLoader Canny CaseConverter CheckpointLoader CheckpointLoaderSimple CheckpointSave
    ChromaRadianceOptions CombineHooks2 CombineHooks4 CombineHooks8 ConditioningAverage ConditioningCombine
    ConditioningConcat ConditioningSetArea ConditioningSetAreaPercentage ConditioningSetAreaPercentageVideo
    ConditioningSetAreaStrength ConditioningSetDefaultCombine ConditioningSetMask ConditioningSetProperties
    ConditioningSetPropertiesAndCombine ConditioningSetTimestepRange ConditioningStableAudio
    ConditioningTimestepsRange ConditioningZeroOut ContextWindowsManual ControlNetApply ControlNetApplyAdvanced
    ControlNetApplySD3 ControlNetInpaintingAliMamaApply ControlNetLoader CosmosImageToVideoLatent
    CosmosPredict2ImageToVideoLatent CreateHookKeyframe CreateHookKeyframesFromFloats
    CreateHookKeyframesInterpolated CreateHookLora CreateHookLoraModelOnly CreateHookModelAsLora
    CreateHookModelAsLoraModelOnly CreateVideo CropMask DiffControlNetLoader DifferentialDiffusion DiffusersLoader
    DisableNoise DualCFGGuider DualCLIPLoader EasyCache EmptyAceStepLatentAudio EmptyAudio
    EmptyChromaRadianceLatentImage EmptyCosmosLatentVideo EmptyHunyuanImageLatent EmptyHunyuanLatentVideo EmptyImage
    EmptyLTXVLatentVideo EmptyLatentAudio EmptyLatentHunyuan3Dv2 EmptyLatentImage EmptyMochiLatentVideo
    EmptySD3LatentImage ExponentialScheduler ExtendIntermediateSigmas FeatherMask FlipSigmas
    FluxDisableGuidance FluxGuidance FluxKontextImageScale FluxKontextMaxImageNode
    FluxKontextMultiReferenceLatentMethod FluxKontextProImageNode FluxProCannyNode FluxProDepthNode
    FluxProExpandNode FluxProFillNode FluxProImageNode FluxProUltraImageNode FreSca FreeU FreeU_V2 GITSScheduler
    GLIGENLoader GLIGENTextBoxApply GeminiImageNode GeminiInputFiles GeminiNode GetImageSize GetVideoComponents
    GrowMask Hunyuan3Dv2Conditioning Hunyuan3Dv2ConditioningMultiView HunyuanImageToVideo HunyuanRefinerLatent
    HyperTile HypernetworkLoader IdeogramV1 IdeogramV2 IdeogramV3 ImageAddNoise ImageBatch ImageBlend ImageBlur
    ImageColorToMask ImageCompositeMasked ImageCrop ImageFlip ImageFromBatch ImageInvert ImageOnlyCheckpointLoader
    ImageOnlyCheckpointSave ImagePadForOutpaint ImageQuantize ImageRGBToYUV ImageRotate ImageScale ImageScaleBy
    ImageScaleToMaxDimension ImageScaleToTotalPixels ImageSharpen ImageStitch ImageToMask ImageUpscaleWithModel
    ImageYUVToRGB InpaintModelConditioning InstructPixToPixConditioning InvertMask JoinImageWithAlpha KSampler
    KSamplerAdvanced KSamplerSelect KarrasScheduler KlingCameraControlI2VNode KlingCameraControlT2VNode
    KlingCameraControls KlingDualCharacterVideoEffectNode KlingImage2VideoNode KlingImageGenerationNode
    KlingLipSyncAudioToVideoNode KlingLipSyncTextToVideoNode KlingSingleImageVideoEffectNode KlingStartEndFrameNode
    KlingTextToVideoNode KlingVideoExtendNode KlingVirtualTryOnNode LTXVAddGuide LTXVConditioning LTXVCropGuides
    LTXVImgToVideo LTXVPreprocess LTXVScheduler LaplaceScheduler LatentAdd LatentApplyOperation
    LatentApplyOperationCFG LatentBatch LatentBatchSeedBehavior LatentBlend LatentComposite LatentCompositeMasked
    LatentConcat LatentCrop LatentCut LatentFlip LatentFromBatch LatentInterpolate LatentMultiply
    LatentOperationSharpen LatentOperationTonemapReinhard LatentRotate LatentSubtract LatentUpscale LatentUpscaleBy
    LazyCache Load3D Load3DAnimation LoadAudio LoadImage LoadImageMask LoadImageOutput LoadImageSetFromFolderNode
    LoadImageTextSetFromFolderNode LoadLatent LoadVideo LoraLoader LoraLoaderModelOnly LoraModelLoader LoraSave
    LossGraphNode LotusConditioning LumaConceptsNode LumaImageModifyNode LumaImageNode LumaImageToVideoNode
    LumaReferenceNode LumaVideoNode Mahiro MaskComposite MaskPreview MaskToImage MinimaxHailuoVideoNode
    MinimaxImageToVideoNode MinimaxSubjectToVideoNode MinimaxTextToVideoNode ModelComputeDtype ModelMergeAdd
    ModelMergeAuraflow ModelMergeBlocks ModelMergeCosmos14B ModelMergeCosmos7B ModelMergeCosmosPredict2_14B
    ModelMergeCosmosPredict2_2B ModelMergeFlux1 ModelMergeLTXV ModelMergeMochiPreview ModelMergeQwenImage
    ModelMergeSD1 ModelMergeSD2 ModelMergeSD35_Large ModelMergeSD3_2B ModelMergeSDXL ModelMergeSimple
    ModelMergeSubtract ModelMergeWAN2_1 ModelPatchLoader ModelSamplingAuraFlow ModelSamplingContinuousEDM
    ModelSamplingContinuousV ModelSamplingDiscrete ModelSamplingFlux ModelSamplingLTXV ModelSamplingSD3
    ModelSamplingStableCascade ModelSave MoonvalleyImg2VideoNode MoonvalleyTxt2VideoNode MoonvalleyVideo2VideoNode
    Morphology OpenAIChatConfig OpenAIChatNode OpenAIDalle2 OpenAIDalle3 OpenAIGPTImage1 OpenAIInputFiles
    OpenAIVideoSora2 OptimalStepsScheduler PairConditioningCombine PairConditioningSetDefaultCombine
    PairConditioningSetProperties PairConditioningSetPropertiesAndCombine PatchModelAddDownscale PerpNeg
    PerpNegGuider PerturbedAttentionGuidance PhotoMakerEncode PhotoMakerLoader PikaImageToVideoNode2_2
    PikaScenesV2_2 PikaStartEndFrameNode2_2 PikaTextToVideoNode2_2 Pikadditions Pikaffects Pikaswaps
    PixverseImageToVideoNode PixverseTemplateNode PixverseTextToVideoNode PixverseTransitionVideoNode
    PolyexponentialScheduler PorterDuffImageComposite Preview3D Preview3DAnimation PreviewAny PreviewAudio
    PreviewImage PrimitiveBoolean PrimitiveFloat PrimitiveInt PrimitiveString PrimitiveStringMultiline
    QuadrupleCLIPLoader QwenImageDiffsynthControlnet RandomNoise RebatchImages RebatchLatents RecordAudio
    RecraftColorRGB RecraftControls RecraftCreativeUpscaleNode RecraftCrispUpscaleNode RecraftImageInpaintingNode
    RecraftImageToImageNode RecraftRemoveBackgroundNode RecraftReplaceBackgroundNode
    RecraftStyleV3DigitalIllustration RecraftStyleV3InfiniteStyleLibrary RecraftStyleV3LogoRaster
    RecraftStyleV3RealisticImage RecraftTextToImageNode RecraftTextToVectorNode RecraftVectorizeImageNode
    ReferenceLatent RegexExtract RegexMatch RegexReplace RenormCFG RepeatImageBatch RepeatLatentBatch RescaleCFG
    ResizeAndPadImage Rodin3D_Detail Rodin3D_Gen2 Rodin3D_Regular Rodin3D_Sketch Rodin3D_Smooth
    RunwayFirstLastFrameNode RunwayImageToVideoNodeGen3a RunwayImageToVideoNodeGen4 RunwayTextToImageNode
    SDTurboScheduler SD_4XUpscale_Conditioning SV3D_Conditioning SVD_img2vid_Conditioning SamplerCustom
    SamplerCustomAdvanced SamplerDPMAdaptative SamplerDPMPP_2M_SDE SamplerDPMPP_2S_Ancestral SamplerDPMPP_3M_SDE
    SamplerDPMPP_SDE SamplerER_SDE SamplerEulerAncestral SamplerEulerAncestralCFGPP SamplerEulerCFGpp
    SamplerLCMUpscale SamplerLMS SamplerSASolver SamplingPercentToSigma SaveAnimatedPNG SaveAnimatedWEBP SaveAudio
    SaveAudioMP3 SaveAudioOpus SaveGLB SaveImage SaveLatent SaveLoRANode SaveSVGNode SaveVideo SaveWEBM
    SelfAttentionGuidance SetClipHooks SetFirstSigma SetHookKeyframes SetLatentNoiseMask SetUnionControlNetType
    SkipLayerGuidanceDiT SkipLayerGuidanceDiTSimple SkipLayerGuidanceSD3 SolidMask SplitAudioChannels
    SplitImageWithAlpha SplitSigmas SplitSigmasDenoise StabilityAudioInpaint StabilityAudioToAudio
    StabilityStableImageSD_3_5Node StabilityStableImageUltraNode StabilityTextToAudio
    StabilityUpscaleConservativeNode StabilityUpscaleCreativeNode StabilityUpscaleFastNode
    StableCascade_EmptyLatentImage StableCascade_StageB_Conditioning StableCascade_StageC_VAEEncode
    StableCascade_SuperResolutionControlnet StableZero123_Conditioning StableZero123_Conditioning_Batched
    StringCompare StringConcatenate StringContains StringLength StringReplace StringSubstring StringTrim
    StyleModelApply StyleModelLoader T5TokenizerOptions TCFG TextEncodeAceStepAudio
    TextEncodeHunyuanVideo_ImageToVideo TextEncodeQwenImageEdit TextEncodeQwenImageEditPlus ThresholdMask
    TomePatchModel TorchCompileModel TrainLoraNode TrimAudioDuration TrimVideoLatent TripleCLIPLoader
    TripoConversionNode TripoImageToModelNode TripoMultiviewToModelNode TripoRefineNode TripoRetargetNode
    TripoRigNode TripoTextToModelNode TripoTextureNode UNETLoader UNetCrossAttentionMultiply
    UNetSelfAttentionMultiply UNetTemporalAttentionMultiply USOStyleReference UpscaleModelLoader VAEDecode
    VAEDecodeAudio VAEDecodeHunyuan3D VAEDecodeTiled VAEEncode VAEEncodeAudio VAEEncodeForInpaint VAEEncodeTiled
    VAELoader VAESave VPScheduler Veo3VideoGenerationNode VeoVideoGenerationNode VideoLinearCFGGuidance
    VideoTriangleCFGGuidance ViduImageToVideoNode ViduReferenceVideoNode ViduStartEndToVideoNode ViduTextToVideoNode
    VoxelToMesh VoxelToMeshBasic Wan22FunControlToVideo Wan22ImageToVideoLatent WanAnimateToVideo WanCameraEmbedding
    WanCameraImageToVideo WanContextWindowsManual WanFirstLastFrameToVideo WanFunControlToVideo WanFunInpaintToVideo
    WanHuMoImageToVideo WanImageToImageApi WanImageToVideo WanImageToVideoApi WanPhantomSubjectToVideo
    WanSoundImageToVideo WanSoundImageToVideoExtend WanTextToImageApi WanTextToVideoApi WanTrackToVideo
    WanVaceToVideo WebcamCapture unCLIPCheckpointLoader unCLIPConditioning
""".split()) | {"Epsilon Scaling"}   # the one id with a space
